"""Match blurred, restored and ground-truth images by name, never by position in a sorted list.

Every pair has a key: its path relative to the folder it came from, with `/` separators and
without the extension, so `scene1/000001.png` in one folder pairs with `scene1/000001.jpg` in
another. A key that is missing on one side, or present only on the other, is a `PairingError`
that names the files.

Layouts understood:
- plain folders: `--blur DIR` (or `--pred DIR`) and `--gt DIR`, searched recursively;
- the GoPro test layout `test/<scene>/blur/*.png` with `test/<scene>/sharp/*.png` (other
  folders such as `blur_gamma/` are ignored); the key is `<scene>/<file stem>`;
- `ROOT/blur` with `ROOT/sharp`, or `ROOT/input` with `ROOT/target`;
- list files (HIDE, RealBlur-J, RealBlur-R) with one `gt_path blur_path` line per pair, relative
  to a root folder. The key is the blurred path without its extension.

A prediction folder is matched to the ground truth by key. It may also mirror the blurred
images' layout (`<scene>/blur/<stem>` for GoPro, the blurred path of a list file) or, for list
files, the ground truth's path, which is what `mbmamba deblur --recursive` writes.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mbmamba_cli.log import get_logger

log = get_logger(__name__)

# Folder names (lower case) that name a split or a side rather than a dataset, in `dataset_label`.
_SPLIT_NAMES = {
    "test",
    "testing",
    "val",
    "valid",
    "validation",
    "eval",
    "blur",
    "blurred",
    "input",
    "sharp",
    "gt",
    "groundtruth",
    "ground_truth",
    "target",
}

# How many file names an error message lists before it gives only the count of the rest.
_MAX_NAMES_IN_MESSAGE = 20


@dataclass(frozen=True)
class ImagePair:
    """One ground-truth image with its blurred input and/or its restored prediction.

    `name` is the key used for matching and in every report; `aliases` are other keys under
    which a prediction file may be stored.
    """

    name: str
    dataset: str
    gt: Path
    blur: Path | None = None
    pred: Path | None = None
    aliases: tuple[str, ...] = field(default=())


class PairingError(ValueError):
    """The two sides of a dataset do not match; `missing` and `extra` hold the file names."""

    def __init__(self, message: str, missing: list[str] | None = None, extra: list[str] | None = None):
        super().__init__(message)
        self.missing = missing or []
        self.extra = extra or []


def _name_list(names: list[str]) -> str:
    """Join file names for a message, cut to the first few with a count of the rest."""
    shown = ", ".join(names[:_MAX_NAMES_IN_MESSAGE])
    hidden = len(names) - _MAX_NAMES_IN_MESSAGE
    return f"{shown} (and {hidden} more)" if hidden > 0 else shown


def _image_extensions() -> frozenset[str]:
    """Return the lower-case extensions (with dot) that the image reader accepts."""
    from mbmamba_cli.io.images import SUPPORTED_EXTENSIONS

    return frozenset(
        ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in SUPPORTED_EXTENSIONS
    )


def _key(relative: Path) -> str:
    """Return the matching key of a relative path: `/`-separated, without the extension."""
    return relative.with_suffix("").as_posix()


def list_images(root: Path) -> dict[str, Path]:
    """Find every image under `root`, recursively, keyed by relative path without extension.

    Hidden files and folders and files with other extensions are skipped. Two images whose
    keys collide (`a.png` and `a.jpg` in one folder) raise `PairingError`.
    """
    if not root.is_dir():
        raise PairingError(f"folder not found: {root}; give an existing folder of images")

    extensions = _image_extensions()
    images: dict[str, Path] = {}
    skipped = 0
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_dir():
            continue
        if path.suffix.lower() not in extensions:
            skipped += 1
            continue

        key = _key(relative)
        if key in images:
            raise PairingError(
                f"two images in {root} have the same name without extension: "
                f"{images[key].relative_to(root)} and {relative}; remove or rename one"
            )
        images[key] = path

    if skipped:
        log.debug("Skipped %d files in %s that are not images", skipped, root)
    return images


def _scenes_with(root: Path, role: str) -> list[Path]:
    """Return the sub-folders of `root` that contain a `role` folder (GoPro `<scene>/blur`)."""
    if not root.is_dir():
        return []
    return sorted(child for child in root.iterdir() if (child / role).is_dir())


def is_gopro_layout(root: Path) -> bool:
    """Tell whether `root` contains GoPro scenes: sub-folders with both `blur/` and `sharp/`."""
    return any((scene / "sharp").is_dir() for scene in _scenes_with(root, "blur"))


def _gopro_root(root: Path) -> Path | None:
    """Return `root` or `root/test` when it contains GoPro scenes, else None."""
    if is_gopro_layout(root):
        return root
    if is_gopro_layout(root / "test"):
        log.info("Using the GoPro test split in %s", root / "test")
        return root / "test"
    return None


def collect_side(root: Path, role: str) -> tuple[dict[str, Path], dict[str, tuple[str, ...]]]:
    """Collect one side of a dataset: the `role` images ("blur" or "sharp") under `root`.

    A GoPro root (or a folder whose `test/` is one) gives `<scene>/<role>/*` keyed by
    `<scene>/<stem>`, with the alias `<scene>/blur/<stem>`. Any other folder is read as a plain
    folder.

    Returns:
        (images by key, aliases by key).
    """
    gopro = _gopro_root(root)
    if gopro is None:
        return list_images(root), {}

    images: dict[str, Path] = {}
    aliases: dict[str, tuple[str, ...]] = {}
    for scene in _scenes_with(gopro, role):
        for key, path in list_images(scene / role).items():
            full_key = f"{scene.name}/{key}"
            images[full_key] = path
            aliases[full_key] = (f"{scene.name}/blur/{key}",)
    log.debug("Found %d %s images in %d GoPro scenes of %s", len(images), role, len(aliases), gopro)
    return images, aliases


def dataset_label(root: Path) -> str:
    """Name a dataset after its folder, keeping the parent for split and side names (`GOPRO/test`)."""
    resolved = root.resolve()
    if resolved.name.lower() in _SPLIT_NAMES and resolved.parent.name:
        return f"{resolved.parent.name}/{resolved.name}"
    return resolved.name or str(root)


def _check_sides(first: dict[str, Path], second: dict[str, Path], first_what: str, second_what: str) -> None:
    """Raise `PairingError` naming the files of each side that have no partner on the other."""
    missing = sorted(str(second[key]) for key in second.keys() - first.keys())
    extra = sorted(str(first[key]) for key in first.keys() - second.keys())
    if not missing and not extra:
        return

    parts = []
    if missing:
        parts.append(f"{len(missing)} {second_what} with no {first_what}: {_name_list(missing)}")
    if extra:
        parts.append(f"{len(extra)} {first_what} with no {second_what}: {_name_list(extra)}")
    raise PairingError(
        "pairs do not match by name; "
        + "; ".join(parts)
        + ". Pairs are matched by relative path without extension.",
        missing=missing,
        extra=extra,
    )


def pair_folders(blur_root: Path, gt_root: Path, dataset: str | None = None) -> list[ImagePair]:
    """Pair the blurred images under `blur_root` with the ground truth under `gt_root` by key.

    Either root may be a plain folder or a GoPro root (scenes with `blur/` and `sharp/`).
    """
    blur, _ = collect_side(blur_root, "blur")
    gt, aliases = collect_side(gt_root, "sharp")
    _check_sides(blur, gt, "blurred images", "ground-truth images")
    if not gt:
        raise PairingError(f"no images found in {gt_root}")

    label = dataset or dataset_label(gt_root)
    return [
        ImagePair(name=key, dataset=label, gt=gt[key], blur=blur[key], aliases=aliases.get(key, ()))
        for key in sorted(gt)
    ]


def ground_truth_pairs(gt_root: Path, dataset: str | None = None) -> list[ImagePair]:
    """List the ground truth under `gt_root` as pairs without inputs, for `attach_predictions`."""
    gt, aliases = collect_side(gt_root, "sharp")
    if not gt:
        raise PairingError(f"no images found in {gt_root}")

    label = dataset or dataset_label(gt_root)
    return [
        ImagePair(name=key, dataset=label, gt=gt[key], aliases=aliases.get(key, ())) for key in sorted(gt)
    ]


def pairs_from_dataset(root: Path, dataset: str | None = None) -> list[ImagePair]:
    """Find the pairs of a dataset root in one of the known layouts.

    Layouts tried in order: GoPro scenes in `root` or `root/test`, `root/blur` with `root/sharp`,
    and `root/input` with `root/target`.
    """
    if not root.is_dir():
        raise PairingError(f"dataset folder not found: {root}")

    label = dataset or dataset_label(root)
    gopro = _gopro_root(root)
    if gopro is not None:
        return pair_folders(gopro, gopro, label)

    for blur_name, gt_name in (("blur", "sharp"), ("input", "target")):
        if (root / blur_name).is_dir() and (root / gt_name).is_dir():
            log.info("Dataset %s: %s/ paired with %s/", label, blur_name, gt_name)
            return pair_folders(root / blur_name, root / gt_name, label)

    raise PairingError(
        f"no known dataset layout in {root}: expected test/<scene>/blur and test/<scene>/sharp "
        "(GoPro), blur/ and sharp/, or input/ and target/. For HIDE and RealBlur use --list."
    )


def pairs_from_list(list_file: Path, root: Path | None = None, dataset: str | None = None) -> list[ImagePair]:
    """Read a list file with one `gt_path blur_path` line per pair (HIDE, RealBlur-J/R).

    Paths are relative to `root`, which defaults to the list file's folder. Blank lines and lines
    starting with `#` are skipped. A malformed line, a repeated blurred image or a listed file
    that does not exist raises `PairingError` naming the line or the files.
    """
    if not list_file.is_file():
        raise PairingError(f"list file not found: {list_file}")
    base = root if root is not None else list_file.parent
    label = dataset or list_file.stem

    pairs: dict[str, ImagePair] = {}
    absent: list[str] = []
    text = list_file.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue

        fields = stripped.split()
        if len(fields) != 2:
            raise PairingError(
                f"{list_file}:{number}: expected two paths `gt_path blur_path`, got {len(fields)} "
                f"fields: {stripped!r}"
            )
        gt_relative, blur_relative = Path(fields[0]), Path(fields[1])
        key = _key(blur_relative)
        if key in pairs:
            raise PairingError(f"{list_file}:{number}: blurred image {blur_relative} is listed twice")

        for path in (base / gt_relative, base / blur_relative):
            if not path.is_file():
                absent.append(str(path))
        pairs[key] = ImagePair(
            name=key,
            dataset=label,
            gt=base / gt_relative,
            blur=base / blur_relative,
            aliases=(_key(gt_relative),),
        )

    if absent:
        raise PairingError(
            f"{len(absent)} files listed in {list_file} not found under {base}: "
            f"{_name_list(absent)}. Give the dataset root with --root.",
            missing=absent,
        )
    if not pairs:
        raise PairingError(f"list file {list_file} has no pairs")
    return [pairs[key] for key in sorted(pairs)]


def attach_predictions(pairs: Iterable[ImagePair], pred_root: Path) -> list[ImagePair]:
    """Attach to every pair the prediction under `pred_root` stored under its name or an alias.

    Raises:
        PairingError: a pair has no prediction, two files match one pair, or a prediction file
            matches no pair. The message names the files.
    """
    predictions = list_images(pred_root)
    owners: dict[str, str] = {}
    attached: list[ImagePair] = []
    missing: list[str] = []
    ambiguous: list[str] = []

    for pair in pairs:
        found = [key for key in (pair.name, *pair.aliases) if key in predictions]
        if not found:
            missing.append(str(pair.gt))
            continue
        if len(found) > 1:
            files = ", ".join(str(predictions[key]) for key in found)
            ambiguous.append(f"{pair.name}: {files}")
            continue

        key = found[0]
        if key in owners:
            ambiguous.append(f"{predictions[key]} matches both {owners[key]} and {pair.name}")
            continue
        owners[key] = pair.name
        attached.append(replace(pair, pred=predictions[key]))

    extra = sorted(str(predictions[key]) for key in predictions.keys() - owners.keys())
    if missing or extra or ambiguous:
        parts = []
        if missing:
            parts.append(f"{len(missing)} ground-truth images with no prediction: {_name_list(missing)}")
        if extra:
            parts.append(f"{len(extra)} predictions with no ground truth: {_name_list(extra)}")
        if ambiguous:
            parts.append(f"{len(ambiguous)} pairs with several predictions: {_name_list(ambiguous)}")
        raise PairingError(
            f"predictions in {pred_root} do not match the ground truth; "
            + "; ".join(parts)
            + ". Predictions are matched by relative path without extension.",
            missing=missing,
            extra=extra,
        )
    return attached


def _unique_labels(groups: list[list[ImagePair]]) -> list[list[ImagePair]]:
    """Rename datasets that share a label (two `test` folders) to `label#2`, `label#3`, ..."""
    seen: dict[str, int] = {}
    renamed = []
    for group in groups:
        label = group[0].dataset
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            group = [replace(pair, dataset=f"{label}#{seen[label]}") for pair in group]
        renamed.append(group)
    return renamed


def collect_pairs(
    *,
    gt: Path | None = None,
    pred: Path | None = None,
    blur: Path | None = None,
    datasets: Iterable[Path] = (),
    lists: Iterable[Path] = (),
    root: Path | None = None,
) -> list[ImagePair]:
    """Build the pairs of an evaluation from the `mbmamba eval` sources.

    Either `gt` with one of `pred` or `blur` (folders), or one or more `datasets` roots and `lists`
    files (each its own dataset), optionally with `pred` when there is exactly one of them. The
    pairs carry a `pred` path when `pred` is given, and a `blur` path otherwise.

    Raises:
        ValueError: the sources do not form one of these combinations.
        PairingError: the files do not pair up.
    """
    datasets, lists = list(datasets), list(lists)
    if root is not None and not lists:
        raise ValueError("--root sets the folder that --list paths are relative to; give --list too")

    if gt is not None:
        if datasets or lists:
            raise ValueError("give either --gt with --pred or --blur, or --dataset/--list, not both")
        if (pred is None) == (blur is None):
            raise ValueError("--gt needs exactly one of --pred (score files) or --blur (run the model)")
        if pred is not None:
            return attach_predictions(ground_truth_pairs(gt), pred)
        return pair_folders(blur, gt)

    if not datasets and not lists:
        raise ValueError("nothing to score: give --gt with --pred or --blur, --dataset ROOT or --list FILE")
    if blur is not None:
        raise ValueError(
            "--blur needs --gt; with --dataset or --list the blurred images come from the dataset"
        )
    if pred is not None and len(datasets) + len(lists) > 1:
        raise ValueError("--pred scores one dataset at a time; give a single --dataset or --list")

    groups = [pairs_from_dataset(path) for path in datasets]
    groups += [pairs_from_list(path, root) for path in lists]
    pairs = [pair for group in _unique_labels(groups) for pair in group]
    if pred is not None:
        return attach_predictions(pairs, pred)
    return pairs
