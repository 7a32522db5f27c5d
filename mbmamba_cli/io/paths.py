"""Collect input images and name their outputs.

INPUT is a file, a folder (its images in sorted order, `recursive` to include sub-folders)
or `-` for a list of paths on stdin. Each input gets a relative path, and its output is
that path under OUTPUT, with an optional suffix before the extension and an optional new
extension. An OUTPUT with an image extension names the output file of a single input.
No output may be an input file.
"""

import os
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mbmamba_cli.io.images import SUPPORTED_EXTENSIONS
from mbmamba_cli.log import get_logger

logger = get_logger(__name__)

STDIN_SOURCE = "-"
# Extension used for an input whose own extension is not an image format we can write.
FALLBACK_EXTENSION = ".png"


@dataclass(frozen=True)
class InputItem:
    """One input file: `path` as found or listed, `relative` its output path under OUTPUT."""

    path: Path
    relative: Path


class InputNotFoundError(FileNotFoundError):
    """INPUT does not exist."""


class InputNotReadableError(PermissionError):
    """The INPUT folder cannot be listed."""


class NoImagesFoundError(ValueError):
    """INPUT is a folder or a list without any image to deblur."""


class OutputConflictError(ValueError):
    """An output path would overwrite an input file or another input's output."""


def collect_inputs(
    source: str | os.PathLike[str],
    recursive: bool = False,
    stdin: TextIO | None = None,
    *,
    exclude: Path | None = None,
) -> list[InputItem]:
    """Return the input images of `source`: a file, a folder, or "-" for a list on stdin.

    A file is returned as given, whatever its extension or content, and is named after
    itself. A folder returns its files with a supported extension (any letter case) in
    sorted order, named by their path inside the folder. Hidden files and folders (names
    starting with ".") are skipped. So is the folder `exclude`, which is meant for the
    OUTPUT folder when it lies inside INPUT. Symbolic links to folders are not followed.

    With "-", every line of `stdin` (default `sys.stdin`) is a path. Blank lines and lines
    starting with "#" are ignored and surrounding whitespace is stripped. Listed paths are
    kept even if they are missing, folders or not images, so that they fail later with a
    reason. A path listed twice is kept once. Listed files with the same name get as many
    parent folder names as it takes to distinguish them (see `_unique_relatives`).

    Raises InputNotFoundError when `source` does not exist, InputNotReadableError when the
    folder cannot be listed and NoImagesFoundError when the folder or list has no image.
    """
    if str(source) == STDIN_SOURCE:
        return _collect_from_list(stdin if stdin is not None else sys.stdin)

    path = Path(source).expanduser()
    if path.is_dir():
        return _collect_from_folder(path, recursive, exclude)
    if path.exists() or path.is_symlink():
        return [InputItem(path=path, relative=Path(path.name))]
    raise InputNotFoundError(
        f"input not found: {path}; check the path, or pass - to read a list of paths from stdin"
    )


def _collect_from_folder(root: Path, recursive: bool, exclude: Path | None) -> list[InputItem]:
    excluded = os.path.realpath(exclude) if exclude is not None else None
    items: list[InputItem] = []
    skipped = 0
    has_subfolders = False

    def report_unlistable(error: OSError) -> None:
        if os.path.realpath(error.filename) == os.path.realpath(root):
            raise InputNotReadableError(
                f"cannot list the input folder {root} ({error.strerror}); check its permissions"
            ) from error
        logger.warning("cannot list %s (%s); skipping it", error.filename, error.strerror)

    for folder, subfolders, files in os.walk(root, onerror=report_unlistable):
        folder_path = Path(folder)
        has_subfolders = has_subfolders or bool(subfolders)
        if recursive:
            subfolders[:] = sorted(
                name
                for name in subfolders
                if _keep_subfolder(folder_path / name, excluded)
            )
        else:
            subfolders.clear()

        for name in files:
            if name.startswith("."):
                logger.debug("skipping hidden file %s", folder_path / name)
                skipped += 1
                continue
            if Path(name).suffix.lower() not in SUPPORTED_EXTENSIONS:
                logger.debug("skipping %s: not a supported image extension", folder_path / name)
                skipped += 1
                continue
            path = folder_path / name
            items.append(InputItem(path=path, relative=path.relative_to(root)))

    if not items:
        hint = ""
        if has_subfolders and not recursive:
            hint = " or pass --recursive to include sub-folders"
        valid = ", ".join(SUPPORTED_EXTENSIONS)
        raise NoImagesFoundError(
            f"no images found in {root} (looked for {valid}); check the folder{hint}"
        )
    items.sort(key=lambda item: item.relative.as_posix())
    logger.debug("found %d images in %s, skipped %d other files", len(items), root, skipped)
    return items


def _keep_subfolder(path: Path, excluded: str | None) -> bool:
    if path.name.startswith("."):
        logger.debug("skipping hidden folder %s", path)
        return False
    if path.is_symlink():
        logger.debug("not following the symbolic link %s", path)
        return False
    if excluded is not None and os.path.realpath(path) == excluded:
        logger.debug("skipping %s: it is the output folder", path)
        return False
    return True


def _collect_from_list(stream: Iterable[str]) -> list[InputItem]:
    paths: list[Path] = []
    seen: dict[str, Path] = {}
    for line in stream:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path = Path(text).expanduser()
        real = os.path.realpath(path)
        if real in seen:
            logger.info("%s is listed twice (%s, %s); deblurring it once", real, seen[real], path)
            continue
        seen[real] = path
        paths.append(path)

    if not paths:
        raise NoImagesFoundError(
            "the list on stdin contains no paths; give one image path per line"
        )
    relatives = _unique_relatives(paths)
    pairs = zip(paths, relatives, strict=True)
    return [InputItem(path=path, relative=relative) for path, relative in pairs]


def _unique_relatives(paths: list[Path]) -> list[Path]:
    """Name listed files by their file name, adding parent folders where names collide.

    Files whose names are equal ignoring case (they would collide on case-insensitive
    file systems) get as many of their parent folder names as it takes to tell them
    apart: /a/2023/img.png and /b/2024/img.png become 2023/img.png and 2024/img.png.
    When no number of parent folders distinguishes the whole group (IMG.png and img.png in
    one folder), the group keeps bare file names, numbered "-2", "-3", ... after the stem
    in list order.
    """
    absolute = [Path(os.path.abspath(path)) for path in paths]
    relatives = [Path(path.name) for path in absolute]
    groups: dict[str, list[int]] = defaultdict(list)
    for index, path in enumerate(absolute):
        groups[path.name.casefold()].append(index)

    for indices in groups.values():
        if len(indices) == 1:
            continue
        deepest = max(len(absolute[index].parts) - 1 for index in indices)
        for depth in range(2, deepest + 1):
            tails = [_tail(absolute[index], depth) for index in indices]
            if len({tail.as_posix().casefold() for tail in tails}) == len(tails):
                for index, tail in zip(indices, tails, strict=True):
                    relatives[index] = tail
                break
        else:
            _number_duplicates(relatives, indices)
    return relatives


def _tail(path: Path, depth: int) -> Path:
    """Return the last `depth` parts of an absolute path, without its root."""
    return Path(*path.parts[1:][-depth:])


def _number_duplicates(relatives: list[Path], indices: list[int]) -> None:
    used_names: set[str] = set()
    for index in indices:
        relative = relatives[index]
        key = relative.as_posix().casefold()
        number = 1
        while key in used_names:
            number += 1
            relative = relatives[index].with_name(
                f"{relatives[index].stem}-{number}{relatives[index].suffix}"
            )
            key = relative.as_posix().casefold()
        used_names.add(key)
        relatives[index] = relative


def normalize_extension(ext: str | None) -> str | None:
    """Return `ext` lower-case with a leading dot ("PNG" -> ".png"), or None for None.

    Raises ValueError naming the valid extensions when `ext` is not one of them.
    """
    if ext is None:
        return None
    normalized = "." + ext.strip().lstrip(".").lower()
    if normalized not in SUPPORTED_EXTENSIONS:
        valid = ", ".join(SUPPORTED_EXTENSIONS)
        raise ValueError(f"output extension {ext!r} is not supported; use one of {valid}")
    return normalized


def output_is_file(output_root: Path) -> bool:
    """Return whether OUTPUT names a file: it has an image extension and is not a folder."""
    return output_root.suffix.lower() in SUPPORTED_EXTENSIONS and not output_root.is_dir()


def output_path_for(
    item: InputItem, output_root: Path, suffix: str = "", ext: str | None = None
) -> Path:
    """Return where the output of `item` goes.

    When OUTPUT names a file (see `output_is_file`) that file is returned unchanged and
    `suffix` is ignored. Otherwise the result is OUTPUT / item.relative with `suffix`
    added to the stem and the extension replaced by `ext`. An input whose extension
    cannot be written (for example a listed ".jfif" file) gets ".png" unless `ext` is set.

    Raises ValueError for an unsupported `ext`, an `ext` that contradicts an OUTPUT file
    name, or a `suffix` containing a path separator.
    """
    output_root = Path(output_root)
    extension = normalize_extension(ext)
    if os.sep in suffix or "/" in suffix:
        raise ValueError(f"suffix {suffix!r} contains a path separator; use a plain name part")

    if output_is_file(output_root):
        if extension is not None and extension != output_root.suffix.lower():
            raise ValueError(
                f"OUTPUT {output_root} is a file name ending in {output_root.suffix} but the "
                f"output extension is {extension}; drop the extension option or rename OUTPUT"
            )
        return output_root

    relative = item.relative
    if extension is None:
        extension = relative.suffix
        if extension.lower() not in SUPPORTED_EXTENSIONS:
            extension = FALLBACK_EXTENSION
    return output_root / relative.parent / f"{relative.stem}{suffix}{extension}"


def check_not_overwriting_input(input_path: Path, output_path: Path) -> None:
    """Raise OutputConflictError when `output_path` is the file `input_path`.

    Compares the paths with symbolic links resolved, and when both exist also by device
    and inode, which catches hard links and case-insensitive file systems.
    """
    same = os.path.realpath(input_path) == os.path.realpath(output_path)
    if not same and os.path.exists(input_path) and os.path.exists(output_path):
        same = os.path.samefile(input_path, output_path)
    if same:
        raise OutputConflictError(
            f"output {output_path} is the input file {input_path}; choose a different OUTPUT "
            "folder or add a suffix"
        )


def plan_outputs(
    items: list[InputItem], output_root: Path, suffix: str = "", ext: str | None = None
) -> list[tuple[InputItem, Path]]:
    """Pair every input with its output path and check the whole batch before any work.

    With a `suffix`, an input whose stem ends in the suffix and whose path is the output
    of another input (a result of an earlier run written next to its input) is dropped
    with a log line. Without a suffix nothing is dropped, so that in a folder holding
    a.jpg and a.png, writing a.jpg as a.png raises instead of replacing an original.
    Raises ValueError when
    OUTPUT names a file but there are several inputs, and OutputConflictError when an
    output would overwrite an input or two inputs would share one output path.
    """
    output_root = Path(output_root)
    if output_is_file(output_root) and len(items) > 1:
        raise ValueError(
            f"OUTPUT {output_root} is a file name but there are {len(items)} inputs; give a "
            "folder as OUTPUT"
        )

    planned = [(item, output_path_for(item, output_root, suffix, ext)) for item in items]
    outputs_of = {os.path.realpath(output): item for item, output in planned}
    remaining: list[tuple[InputItem, Path]] = []
    for item, output in planned:
        producer = outputs_of.get(os.path.realpath(item.path))
        earlier_result = suffix and item.path.stem.endswith(suffix)
        if earlier_result and producer is not None and producer is not item:
            logger.info("skipping %s: it is the output of %s", item.path, producer.path)
            continue
        remaining.append((item, output))

    inputs = {os.path.realpath(item.path): item for item, _ in remaining}
    claimed: dict[str, InputItem] = {}
    for item, output in remaining:
        check_not_overwriting_input(item.path, output)
        real_output = os.path.realpath(output)
        other_input = inputs.get(real_output)
        if other_input is not None:
            raise OutputConflictError(
                f"the output of {item.path} would overwrite the input {other_input.path}; "
                "choose a different OUTPUT folder or add a suffix"
            )
        earlier = claimed.get(real_output)
        if earlier is not None:
            raise OutputConflictError(
                f"{earlier.path} and {item.path} would both be written to {output}; keep "
                "their extensions (no extension option) or use a different OUTPUT folder"
            )
        claimed[real_output] = item
    return remaining
