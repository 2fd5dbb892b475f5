"""Prebuilt, portable custom-op libraries: ``ctr build-ops --arch LEVELS --out DIR`` and
``CTR_OPS_LIBRARY=DIR`` choosing the highest level this CPU runs (ctr.native.select).

The libraries here are real builds (the session fixture ``ops_levels`` in conftest.py
compiles each level this CPU supports once); only the CPU's flags are passed in, to act
as a CPU with fewer instructions than this one."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import pytest

from ctr import native
from ctr.cli import main
from tests.helpers import missing


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every library path :func:`native.describe` loads (in its child process) from now on."""
    seen: list[Path] = []
    real = native.describe

    def spy(path: Path) -> native.OpsLibrary:
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(native, "describe", spy)
    return seen


def copy_levels(src: Path, dst: Path, levels: list[str]) -> Path:
    for level in levels:
        shutil.copytree(src / level, dst / level)
    return dst


def test_build_ops_out_writes_each_level_with_its_stamp(ops_levels: Path) -> None:
    levels = native.supported_levels()
    assert "x86-64-v2" in levels or native.platform.machine() != "x86_64"
    assert sorted(p.name for p in ops_levels.iterdir()) == sorted(levels)
    for level in levels:
        lib = ops_levels / level / native.LIB_NAME
        stamp = (ops_levels / level / (native.LIB_NAME + ".sha256")).read_text().split()
        assert stamp == [native._file_sha256(lib)]
        assert lib.stat().st_mode & stat.S_IROTH  # readable by the image's non-root user
    if len(levels) > 1:  # different -march flags: different code
        digests = {native._file_sha256(ops_levels / lv / native.LIB_NAME) for lv in levels}
        assert len(digests) == len(levels)


def test_selection_picks_the_highest_level_this_cpu_supports(
    ops_levels: Path, loaded: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "_known", {})  # another test may have asked already
    best = native.supported_levels()[0]
    chosen = native.select(ops_levels)
    assert chosen.level == best and chosen.path == ops_levels / best / native.LIB_NAME
    assert not chosen.cuda
    assert loaded == [chosen.path]  # the first supported level loads: nothing else tried
    # CTR_OPS_LIBRARY=DIR goes the same way, and the answer is kept for this process
    first = native.library(str(ops_levels))
    assert first == chosen
    assert native.library(str(ops_levels)) is first
    assert len(loaded) == 2  # select() once more for library(), not for the second call


def test_a_level_whose_flags_this_cpu_lacks_is_never_loaded(
    ops_levels: Path, tmp_path: Path, loaded: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    # a folder with v4 and v2 (both real builds; v4 from this CPU's list when it has
    # AVX-512, else the v2 build under v4's name: either way one it must not load)
    top = "x86-64-v4" if "x86-64-v4" in native.supported_levels() else "x86-64-v2"
    if "x86-64-v2" not in native.supported_levels():
        pytest.skip("not an x86-64 CPU")
    folder = tmp_path / "ops"
    shutil.copytree(ops_levels / top, folder / "x86-64-v4")
    shutil.copytree(ops_levels / "x86-64-v2", folder / "x86-64-v2")
    v2_cpu = native.LEVEL_FLAGS["x86-64-v2"] | {"fpu", "sse2"}  # no AVX at all
    with caplog.at_level(logging.INFO, logger="ctr.native"):
        chosen = native.select(folder, flags=v2_cpu)
    assert chosen.level == "x86-64-v2"
    assert loaded == [folder / "x86-64-v2" / native.LIB_NAME]  # v4: not even in a child
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "x86-64-v4: skipped, not loaded: this CPU lacks abm avx avx2" in said
    assert all(r.levelno == logging.INFO for r in caplog.records)  # routine, no warning
    # and with nothing this CPU can run, the error names each level and why
    shutil.rmtree(folder / "x86-64-v2")
    with pytest.raises(native.NativeError) as err:
        native.select(folder, flags=v2_cpu)
    assert str(folder) in str(err.value)
    assert "x86-64-v4: skipped, not loaded: this CPU lacks abm avx avx2" in str(err.value)
    assert len(loaded) == 1


@pytest.mark.parametrize("damage", ["truncated", "restamped"])
def test_a_corrupt_highest_library_falls_through_to_the_next(
    ops_levels: Path, tmp_path: Path, loaded: list[Path], caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:  # fmt: skip
    levels = native.supported_levels()  # at least one x86 level and generic here
    folder = copy_levels(ops_levels, tmp_path / "ops", levels[:2])
    top = folder / levels[0] / native.LIB_NAME
    data = top.read_bytes()
    top.write_bytes(data[: len(data) // 3])
    if damage == "restamped":  # the stamp agrees: the child-process load must refuse it
        (top.parent / (native.LIB_NAME + ".sha256")).write_text(native._file_sha256(top))
    with caplog.at_level(logging.INFO, logger="ctr.native"):
        chosen = native.select(folder)
    assert chosen.level == levels[1]
    assert chosen.path == folder / levels[1] / native.LIB_NAME
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"level {levels[1]} chosen" in warnings[0]
    assert levels[0] in warnings[0]
    if damage == "truncated":  # the stamp check refuses it before any load
        assert "does not match its stamp" in warnings[0]
        assert loaded == [chosen.path]
    else:
        assert "not a usable custom-op library" in warnings[0]
        assert loaded == [top, chosen.path]


def test_every_level_broken_names_each_one(ops_levels: Path, tmp_path: Path) -> None:
    levels = native.supported_levels()
    folder = copy_levels(ops_levels, tmp_path / "ops", levels)
    for level in levels:
        (folder / level / (native.LIB_NAME + ".sha256")).unlink()
    (folder / "x86-64-v9").mkdir()
    (folder / "x86-64-v9" / native.LIB_NAME).write_bytes(b"")
    with pytest.raises(native.NativeError) as err:
        native.library(str(folder))
    text = str(err.value)
    assert f"no usable custom-op library in {folder}" in text
    for level in levels:
        assert f"{level}: no readable sha256 stamp" in text
    assert "not a known level, ignored: x86-64-v9" in text


def test_an_empty_folder_is_a_native_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(native.NativeError, match=f"{tmp_path} holds no <level>/libctr_ops.so"):
        native.library(str(tmp_path))


def test_build_ops_rejects_what_cannot_go_in_a_prebuilt_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ops"
    assert main(["build-ops", "--cuda", "no", "--out", str(out)]) == 2
    assert "--out needs --arch" in capsys.readouterr().err
    for arch, says in (("native", "builds for this CPU only"), ("x86-64-v9", "unknown level")):
        assert main(["build-ops", "--cuda", "no", "--arch", arch, "--out", str(out)]) == 2
        err = capsys.readouterr().err  # wrong input: one line, exit 2, as every command
        assert says in err and err.startswith("ctr build-ops: error: ")
    assert not out.exists()


def test_a_level_the_compiler_rejects_fails_with_its_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a compiler without x86-64-v4 (g++ before 11, or any x86 level on another machine
    # type): a wrapper that says what such a g++ says and hands everything else on
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        missing("no C++ compiler")
    wrapper = tmp_path / "old-g++"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do if [ "$a" = -march=x86-64-v4 ]; then\n'
        "  echo \"cc1plus: error: bad value ('x86-64-v4') for '-march=' switch\" >&2\n"
        "  exit 1\nfi; done\n"
        f'exec {cxx} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("CTR_OPS_CACHE", str(tmp_path / "cache"))
    rc = main(["build-ops", "--cuda", "no", "--arch", "x86-64-v4", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{wrapper} rejects -march=x86-64-v4: cc1plus: error: bad value" in err
    assert not (tmp_path / "cache").exists()  # refused before any build step


@pytest.mark.skipif(native.find_nvcc() is None, reason="no nvcc to compile the CUDA kernel")
def test_the_cuda_build_compiles_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a GPU machine builds at first use: the CPU kernels plus the AUGRU's CUDA kernel
    (for a fixed architecture here: no GPU is needed to compile or to load it). The CUDA
    architecture flags once overwrote the CPU level's name and the build raised."""
    monkeypatch.setenv("CTR_OPS_CACHE", str(tmp_path))
    monkeypatch.setenv("CTR_OPS_CUDA_ARCH", "-arch=sm_90")
    lib = native.build(cuda=True)
    assert lib.cuda and lib.path.is_file()
    assert native.describe(lib.path) == lib  # self-tested in a child: it loads


def test_a_library_others_can_write_is_never_loaded(
    ops_levels: Path, tmp_path: Path, loaded: list[Path]
) -> None:
    """A security review planted a library in a cache folder others could write (and
    rewrote its stamp, which only detects damage): it ran in the service's process. A
    library whose file or folders another user could have written is skipped unloaded."""
    levels = native.supported_levels()
    folder = copy_levels(ops_levels, tmp_path / "ops", levels[:2])
    (folder / levels[0]).chmod(0o777)  # anyone could have put the top level's file there
    chosen = native.select(folder)
    assert chosen.level == levels[1] and loaded == [chosen.path]  # never loaded the top
    why = native._untrusted(folder / levels[0] / native.LIB_NAME)
    assert "writable by its group or others" in why
    (folder / levels[0]).chmod(0o755)
    (folder / levels[0] / native.LIB_NAME).chmod(0o666)
    assert "writable" in native._untrusted(folder / levels[0] / native.LIB_NAME)
    (folder / levels[0] / native.LIB_NAME).chmod(0o755)
    assert native._untrusted(folder / levels[0] / native.LIB_NAME) == ""


def test_the_build_cache_refuses_a_library_others_could_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build cache's copy is checked the same way before it is loaded, and the
    folders the build makes are this user's only."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        missing("no C++ compiler")
    built = native.library()  # this checkout's, from the usual cache
    cache = tmp_path / "cache"
    target = cache / built.path.parent.name
    shutil.copytree(built.path.parent, target)
    monkeypatch.setenv("CTR_OPS_CACHE", str(cache))
    target.chmod(0o777)
    with pytest.raises(native.NativeError, match="writable by its group or others"):
        native._build(False, None, None)
    target.chmod(0o700)
    assert native._build(False, None, None).path == target / native.LIB_NAME


def test_a_cache_folder_someone_else_made_is_not_built_in_and_a_loose_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second review: a digest folder another user made before the first build (the
    digest is predictable) was built in and the result loaded; a CTR_OPS_LIBRARY file
    was loaded unchecked."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        missing("no C++ compiler")
    built = native.library()
    cache = tmp_path / "cache"
    planted = cache / built.path.parent.name
    planted.mkdir(parents=True)
    planted.chmod(0o777)  # made by "someone else": anyone may write in it
    monkeypatch.setenv("CTR_OPS_CACHE", str(cache))
    with pytest.raises(native.NativeError, match="not used"):
        native._build(False, None, None)
    loose = tmp_path / "loose" / native.LIB_NAME
    loose.parent.mkdir()
    shutil.copyfile(built.path, loose)
    loose.chmod(0o666)
    with pytest.raises(native.NativeError, match="writable by its group or others"):
        native.library(str(loose))
