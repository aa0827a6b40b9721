"""The kernel cache: a private folder, a library loaded only when its sha256 matches the record, rebuilt when
changed, unrecorded or failing to load; a folder others can write to is not used."""

import ctypes
import hashlib
import os
import shutil

import pytest

from dsserve.backends.cpu import kernels as cpu_kernels


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build (the library and its record), copied into each test's cache folder."""
    folder = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "_state", {})
        mp.setenv("DSSERVE_CACHE_DIR", str(folder))
        if cpu_kernels._compiler() is None or cpu_kernels.library() is None:
            pytest.skip(f"the kernels do not build here ({cpu_kernels.why_unavailable()})")
    (library,) = (folder / "kernels").glob("dsserve_cpu-*.so")
    return library


@pytest.fixture
def cache(built, tmp_path, monkeypatch):
    """A cache folder holding the built library and its record; `library()` not yet called."""
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DSSERVE_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o700)
    shutil.copy(built, folder / built.name)
    record = built.with_name(built.name + ".sha256")
    if record.exists():
        shutil.copy(record, folder / record.name)
    return folder / built.name


@pytest.fixture
def builds(built, monkeypatch):
    """The outputs of every build, which copies the module's real build (compiling again takes seconds)."""
    outputs = []

    def copy_the_build(compiler, flags, output, file_flags):
        outputs.append(output)
        shutil.copyfile(built, output)

    monkeypatch.setattr(cpu_kernels, "_compile_and_link", copy_the_build)
    return outputs


@pytest.fixture
def loads(monkeypatch):
    """(path, sha256 of the file at that moment) for every library ctypes opens."""
    opened = []
    real = ctypes.CDLL

    def spy(name, *args, **kwargs):
        opened.append((name, hashlib.sha256(open(name, "rb").read()).hexdigest()))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels.ctypes, "CDLL", spy)
    return opened


def test_cache_folder_is_created_private_with_a_record(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DSSERVE_CACHE_DIR", str(tmp_path))
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        assert cpu_kernels.library() is not None
    finally:
        os.umask(old_umask)
    folder = tmp_path / "kernels"
    assert folder.stat().st_mode & 0o777 == 0o700
    (library,) = folder.glob("dsserve_cpu-*.so")
    record = library.with_name(library.name + ".sha256")
    assert record.read_text().strip() == _sha256(library)
    assert sorted(p.name for p in folder.iterdir()) == sorted([library.name, record.name])  # no temporary left


def test_a_matching_library_is_loaded_without_a_build(cache, builds, loads):
    assert cpu_kernels.library() is not None
    assert builds == [] and loads == [(str(cache), _sha256(cache))]


@pytest.mark.parametrize("tamper", ["library", "record", "no record"])
def test_a_changed_library_or_record_is_rebuilt_not_loaded(cache, builds, loads, tamper, caplog):
    record = cache.with_name(cache.name + ".sha256")
    if tamper == "library":
        with open(cache, "ab") as f:  # still a loadable ELF file: only the record tells it changed
            f.write(b"\0planted")
    elif tamper == "record":
        record.write_text("0" * 64 + "\n")
    else:
        record.unlink()
    tampered = _sha256(cache)
    assert cpu_kernels.library() is not None
    assert len(builds) == 1 and len(loads) == 1
    assert loads[0] == (str(cache), _sha256(cache)) and _sha256(cache) == record.read_text().strip()
    if tamper == "library":
        assert loads[0][1] != tampered and not cache.read_bytes().endswith(b"\0planted")
    if tamper != "no record":
        assert "does not match its recorded sha256" in caplog.text


def test_a_library_that_does_not_load_is_rebuilt_once(cache, builds, monkeypatch, caplog):
    real, calls = ctypes.CDLL, []

    def fails_first(name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 1:
            raise OSError(f"{name}: cannot open shared object file")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels.ctypes, "CDLL", fails_first)
    assert cpu_kernels.library() is not None
    assert calls == [str(cache)] * 2 and len(builds) == 1
    assert "does not load" in caplog.text and "rebuilding it" in caplog.text


def test_a_library_that_never_loads_is_reported(cache, builds, monkeypatch, caplog):
    calls = []

    def always_fails(name, *args, **kwargs):
        calls.append(name)
        raise OSError(f"{name}: wrong ELF class")

    monkeypatch.setattr(cpu_kernels.ctypes, "CDLL", always_fails)
    assert cpu_kernels.library() is None
    assert len(calls) == 2 and len(builds) == 1  # the cached one, then the rebuilt one: no loop, not skipped silently
    assert "wrong ELF class" in cpu_kernels.why_unavailable() and "CPU kernels unavailable" in caplog.text


@pytest.mark.parametrize("problem", ["group-writable", "world-writable", "another owner"])
def test_a_folder_others_can_write_is_not_trusted(cache, builds, loads, problem, caplog):
    folder = cache.parent
    if problem == "another owner":
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(folder, 4242, -1)
    else:
        os.chmod(folder, 0o770 if problem == "group-writable" else 0o777)
    assert cpu_kernels.library() is not None
    assert len(builds) == 1 and len(loads) == 1 and not loads[0][0].startswith(str(folder))
    assert f"kernel cache {folder} is not private" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == sorted([cache.name, cache.name + ".sha256"])  # untouched
