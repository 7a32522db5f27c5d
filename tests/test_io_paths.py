"""Tests for input collection (file, folder, recursive, stdin list) and output naming."""

import io
import os
from pathlib import Path

import pytest

from mbmamba_cli.io.paths import (
    InputItem,
    InputNotFoundError,
    NoImagesFoundError,
    OutputConflictError,
    check_not_overwriting_input,
    collect_inputs,
    normalize_extension,
    output_is_file,
    output_path_for,
    plan_outputs,
)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded here")
    return path


def _relatives(items: list[InputItem]) -> list[str]:
    return [item.relative.as_posix() for item in items]


@pytest.fixture
def album(tmp_path: Path) -> Path:
    """A folder with images, other files, hidden entries and nested folders."""
    root = tmp_path / "album"
    for name in [
        "b.JPG",
        "a.png",
        "c.tiff",
        "notes.txt",
        ".hidden.png",
        "sub/d.webp",
        "sub/deeper/e.bmp",
        ".cache/f.png",
        "sub/.g.png",
    ]:
        _touch(root / name)
    return root


# --- collect_inputs --------------------------------------------------------------------------


def test_folder_lists_images_sorted(album: Path) -> None:
    items = collect_inputs(str(album))

    assert _relatives(items) == ["a.png", "b.JPG", "c.tiff"]
    assert items[0].path == album / "a.png"


def test_folder_recursive_keeps_relative_paths(album: Path) -> None:
    items = collect_inputs(str(album), recursive=True)

    assert _relatives(items) == ["a.png", "b.JPG", "c.tiff", "sub/d.webp", "sub/deeper/e.bmp"]


def test_folder_recursive_skips_output_folder(album: Path) -> None:
    _touch(album / "deblurred" / "a.png")

    items = collect_inputs(str(album), recursive=True, exclude=album / "deblurred")

    assert "deblurred/a.png" not in _relatives(items)


def test_folder_skips_writer_temp_files(tmp_path: Path) -> None:
    _touch(tmp_path / "x.png")
    _touch(tmp_path / ".mbmamba-0123456789abcdef.tmp")

    assert _relatives(collect_inputs(str(tmp_path))) == ["x.png"]


def test_folder_without_images_hints_recursive(tmp_path: Path) -> None:
    _touch(tmp_path / "sub" / "x.png")

    with pytest.raises(NoImagesFoundError) as raised:
        collect_inputs(str(tmp_path))

    assert str(tmp_path) in str(raised.value)
    assert "--recursive" in str(raised.value)


def test_empty_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(NoImagesFoundError, match="no images found"):
        collect_inputs(str(tmp_path))


def test_single_file_named_after_itself(tmp_path: Path) -> None:
    path = _touch(tmp_path / "shots" / "one.png")

    items = collect_inputs(str(path))

    assert items == [InputItem(path=path, relative=Path("one.png"))]


def test_single_file_unsupported_extension_kept(tmp_path: Path) -> None:
    path = _touch(tmp_path / "scan.jfif")

    assert collect_inputs(str(path)) == [InputItem(path=path, relative=Path("scan.jfif"))]


def test_missing_source_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(InputNotFoundError) as raised:
        collect_inputs(str(missing))

    assert isinstance(raised.value, FileNotFoundError)
    assert str(missing) in str(raised.value)


def test_non_ascii_folder(tmp_path: Path) -> None:
    root = tmp_path / "ph oto ü 写真"
    _touch(root / "ph oto ü 写真.png")

    assert _relatives(collect_inputs(str(root))) == ["ph oto ü 写真.png"]


# --- stdin lists -----------------------------------------------------------------------------


def test_stdin_skips_blanks_and_comments(tmp_path: Path) -> None:
    first, second = _touch(tmp_path / "a.png"), _touch(tmp_path / "b.jpg")
    listing = f"# photos\n\n{first}\n   \n  {second}  \n"

    items = collect_inputs("-", stdin=io.StringIO(listing))

    assert [item.path for item in items] == [first, second]
    assert _relatives(items) == ["a.png", "b.jpg"]


def test_stdin_same_names_get_parent_folders(tmp_path: Path) -> None:
    first = _touch(tmp_path / "2023" / "trip" / "img.png")
    second = _touch(tmp_path / "2024" / "trip" / "img.png")
    other = _touch(tmp_path / "2024" / "solo.png")

    items = collect_inputs("-", stdin=io.StringIO(f"{first}\n{second}\n{other}\n"))

    assert _relatives(items) == ["2023/trip/img.png", "2024/trip/img.png", "solo.png"]


def test_stdin_names_differing_in_case_numbered(tmp_path: Path) -> None:
    upper = _touch(tmp_path / "IMG.png")
    lower = tmp_path / "img.png"
    if upper.exists() and lower.exists():
        pytest.skip("case-insensitive file system: IMG.png and img.png are one file")
    _touch(lower)

    items = collect_inputs("-", stdin=io.StringIO(f"{upper}\n{lower}\n"))

    relatives = _relatives(items)
    assert len({name.casefold() for name in relatives}) == 2
    assert relatives[0] == "IMG.png"


def test_stdin_duplicate_path_kept_once(tmp_path: Path) -> None:
    path = _touch(tmp_path / "a.png")
    relative_form = os.path.relpath(path)

    items = collect_inputs("-", stdin=io.StringIO(f"{path}\n{relative_form}\n"))

    assert len(items) == 1


def test_stdin_keeps_missing_folders_and_others(tmp_path: Path) -> None:
    folder = tmp_path / "sub"
    folder.mkdir()
    text = _touch(tmp_path / "notes.txt")
    missing = tmp_path / "gone.png"

    items = collect_inputs("-", stdin=io.StringIO(f"{folder}\n{text}\n{missing}\n"))

    assert [item.path for item in items] == [folder, text, missing]


def test_stdin_empty_list_raises() -> None:
    with pytest.raises(NoImagesFoundError, match="stdin"):
        collect_inputs("-", stdin=io.StringIO("# nothing\n\n"))


# --- output naming ---------------------------------------------------------------------------


def test_output_same_relative_path(tmp_path: Path) -> None:
    item = InputItem(path=tmp_path / "in" / "sub" / "x.JPG", relative=Path("sub/x.JPG"))

    assert output_path_for(item, tmp_path / "out") == tmp_path / "out" / "sub" / "x.JPG"


def test_output_suffix_before_extension(tmp_path: Path) -> None:
    item = InputItem(path=tmp_path / "x.png", relative=Path("x.png"))

    assert output_path_for(item, tmp_path, suffix="_sharp") == tmp_path / "x_sharp.png"


@pytest.mark.parametrize("ext", ["tif", ".TIF", " .tif "])
def test_output_ext_replaces_extension(tmp_path: Path, ext: str) -> None:
    item = InputItem(path=tmp_path / "x.png", relative=Path("x.png"))

    output = output_path_for(item, tmp_path / "out", suffix="-d", ext=ext)

    assert output == tmp_path / "out" / "x-d.tif"


def test_output_invalid_ext_lists_valid(tmp_path: Path) -> None:
    item = InputItem(path=tmp_path / "x.png", relative=Path("x.png"))

    with pytest.raises(ValueError) as raised:
        output_path_for(item, tmp_path, ext="gif")

    assert "'gif'" in str(raised.value)
    assert ".png" in str(raised.value)


def test_output_unwritable_input_extension_becomes_png(tmp_path: Path) -> None:
    item = InputItem(path=tmp_path / "scan.jfif", relative=Path("scan.jfif"))

    assert output_path_for(item, tmp_path / "out") == tmp_path / "out" / "scan.png"


def test_output_file_target_written_exactly(tmp_path: Path) -> None:
    item = InputItem(path=tmp_path / "x.jpg", relative=Path("x.jpg"))
    target = tmp_path / "result.PNG"

    assert output_is_file(target)
    assert output_path_for(item, target, suffix="_ignored") == target


def test_output_file_target_conflicting_ext(tmp_path: Path) -> None:
    item = InputItem(path=tmp_path / "x.jpg", relative=Path("x.jpg"))

    with pytest.raises(ValueError, match="result.png"):
        output_path_for(item, tmp_path / "result.png", ext=".jpg")


def test_output_folder_named_like_image(tmp_path: Path) -> None:
    folder = tmp_path / "looks.png"
    folder.mkdir()
    item = InputItem(path=tmp_path / "x.jpg", relative=Path("x.jpg"))

    assert not output_is_file(folder)
    assert output_path_for(item, folder) == folder / "x.jpg"


def test_output_suffix_with_separator_rejected(tmp_path: Path) -> None:
    item = InputItem(path=tmp_path / "x.png", relative=Path("x.png"))

    with pytest.raises(ValueError, match="separator"):
        output_path_for(item, tmp_path, suffix="a/b")


def test_normalize_extension() -> None:
    assert normalize_extension("JPEG") == ".jpeg"
    assert normalize_extension(None) is None


# --- overwrite guard -------------------------------------------------------------------------


def test_guard_same_path(tmp_path: Path) -> None:
    path = _touch(tmp_path / "x.png")

    with pytest.raises(OutputConflictError) as raised:
        check_not_overwriting_input(path, tmp_path / "." / "x.png")

    assert str(path) in str(raised.value)


def test_guard_symlink_to_input(tmp_path: Path) -> None:
    path = _touch(tmp_path / "x.png")
    link_folder = tmp_path / "link"
    link_folder.symlink_to(tmp_path, target_is_directory=True)

    with pytest.raises(OutputConflictError):
        check_not_overwriting_input(path, link_folder / "x.png")


def test_guard_hard_link(tmp_path: Path) -> None:
    path = _touch(tmp_path / "x.png")
    os.link(path, tmp_path / "y.png")

    with pytest.raises(OutputConflictError):
        check_not_overwriting_input(path, tmp_path / "y.png")


def test_guard_other_file_allowed(tmp_path: Path) -> None:
    path = _touch(tmp_path / "x.png")

    check_not_overwriting_input(path, tmp_path / "x_sharp.png")


def test_plan_output_folder_is_input_folder(album: Path) -> None:
    items = collect_inputs(str(album))

    with pytest.raises(OutputConflictError, match="is the input file"):
        plan_outputs(items, album)


def test_plan_in_place_with_suffix(album: Path) -> None:
    items = collect_inputs(str(album))

    planned = plan_outputs(items, album, suffix="_sharp")

    assert [output.name for _, output in planned] == ["a_sharp.png", "b_sharp.JPG", "c_sharp.tiff"]


def test_plan_rerun_drops_earlier_results(album: Path) -> None:
    _touch(album / "a_sharp.png")
    items = collect_inputs(str(album))

    planned = plan_outputs(items, album, suffix="_sharp")

    assert [item.relative.name for item, _ in planned] == ["a.png", "b.JPG", "c.tiff"]


def test_plan_ext_collision_raises(tmp_path: Path) -> None:
    _touch(tmp_path / "in" / "a.jpg")
    _touch(tmp_path / "in" / "a.png")
    items = collect_inputs(str(tmp_path / "in"))

    with pytest.raises(OutputConflictError, match="both be written"):
        plan_outputs(items, tmp_path / "out", ext="png")


def test_plan_ext_overwriting_other_input_raises(tmp_path: Path) -> None:
    _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "a.png")
    items = collect_inputs(str(tmp_path))

    with pytest.raises(OutputConflictError):
        plan_outputs(items, tmp_path, ext="png")


def test_plan_file_output_with_many_inputs(album: Path, tmp_path: Path) -> None:
    items = collect_inputs(str(album))

    with pytest.raises(ValueError, match="3 inputs"):
        plan_outputs(items, tmp_path / "single.png")


def test_plan_file_output_single_input(tmp_path: Path) -> None:
    path = _touch(tmp_path / "x.jpg")

    planned = plan_outputs(collect_inputs(str(path)), tmp_path / "out" / "sharp.png")

    assert planned[0][1] == tmp_path / "out" / "sharp.png"
