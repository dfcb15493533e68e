"""Files and their provenance: sha256 of files, JSON written atomically, library and code versions, and output
folders written to a staging folder that an interrupted run resumes, renamed into place only when complete.

A failed or interrupted run never touches `outputs/<name>`: its work stays in the staging folder for the next run
of the same recipe to continue (Staging). A finished output (one with a `report.md`) is replaced only with
`force`, and then only after the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import platform
import shutil
import struct
from importlib import metadata
from pathlib import Path

from quantize.common.errors import QuantizeError

LIBRARIES = ("quantize", "torch", "transformers", "compressed-tensors", "bitsandbytes", "safetensors", "gguf",
             "tokenizers", "numpy")
FINISHED_MARKER = "report.md"


def read_text(path: Path, what: str) -> str:
    """A text file as UTF-8, or one message naming the file and what it should be (a binary file, a wrong
    encoding), where it enters."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QuantizeError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); expected {what}") from None


def read_json(path: Path, what: str = "a JSON object") -> dict:
    """A JSON file, or one message naming the file, the line and column of the error and what it should be."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise QuantizeError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                            f"expected {what}") from None


def check_safetensors(path: Path) -> None:
    """A .safetensors file whose header parses and whose tensors all lie inside the file (an interrupted download
    or copy leaves a truncated one that would otherwise fail deep inside a loader, or be measured as whole)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise QuantizeError(f"{path}: truncated or not a safetensors file ({size} bytes; its header needs "
                                f"{'more' if n is None else 8 + n}); download or copy it again")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QuantizeError(f"{path}: not a safetensors file (its header is not JSON)") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise QuantizeError(f"{path}: truncated: its tensors need {8 + n + end} bytes, the file has {size} (an "
                            "interrupted download or copy?); download or copy it again")


def check_checkpoint(folder: Path) -> None:
    """Every safetensors file of an HF folder, checked where the folder enters (run, fit, eval)."""
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


def check_gguf(path: Path) -> None:
    """A GGUF file whose header, metadata and tensor table parse and whose every tensor lies inside the file (what
    gguf-py's GGUFReader checks, without building a Python object per vocabulary entry: GGUFReader takes about 14 s
    on Gemma 3's 262k-token metadata, this well under 1 s)."""
    try:
        gguf_tensor_extents(path)
    except (ValueError, struct.error, KeyError, IndexError, OSError) as exc:
        raise QuantizeError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); truncated or "
                            "corrupt? download or convert it again") from None


# GGUF metadata value types (gguf-py's GGUFValueType) → struct format of one scalar; 8 is a string, 9 an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_tensor_extents(path: Path) -> dict[str, tuple[int, int, int]]:
    """GGUF tensor name → (GGML type, byte offset in the file, bytes), read from the header (little-endian GGUF v2/v3
    as llama.cpp writes it); raises ValueError when the layout does not hold (a tensor past the end of the file)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader: 2, 3, little-endian)")
        pos = 24

        def string(at: int) -> tuple[bytes, int]:
            (n,) = struct.unpack_from("<Q", buf, at)
            if at + 8 + n > size:
                raise ValueError("a string runs past the end of the file")
            return buf[at + 8 : at + 8 + n], at + 8 + n

        def skip(kind: int, at: int) -> int:
            if kind in _GGUF_SCALARS:
                return at + struct.calcsize(_GGUF_SCALARS[kind])
            if kind == 8:
                return string(at)[1]
            if kind == 9:
                item, count = struct.unpack_from("<IQ", buf, at)
                at += 12
                if item in _GGUF_SCALARS:
                    return at + count * struct.calcsize(_GGUF_SCALARS[item])
                for _ in range(count):
                    at = skip(item, at)
                return at
            raise ValueError(f"unknown metadata value type {kind}")

        alignment = 32
        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            if key == b"general.alignment" and kind == 4:
                (alignment,) = struct.unpack_from("<I", buf, pos + 4)
            pos = skip(kind, pos + 4)
        tensors = {}
        for _ in range(n_tensors):
            name, pos = string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            tensors[name.decode()] = (kind, offset, math.prod(dims) // block * block_bytes)
        data = (pos + alignment - 1) // alignment * alignment
        for name, (kind, offset, n) in tensors.items():
            if data + offset + n > size:
                raise ValueError(f"tensor {name} ends at byte {data + offset + n}, past the file's {size}")
        return {name: (kind, data + offset, n) for name, (kind, offset, n) in tensors.items()}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", "results.json")
    }


def files_sha256(path: Path) -> str:
    """Content hash of a model: every file that holds weights or shapes (safetensors, GGUF, config)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix in (".safetensors", ".gguf", ".json", ".bin"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


def write_json(path: Path, data: dict | list) -> None:
    """`data` as JSON at `path`, whole or not at all (a temporary file of this process, then a rename)."""
    tmp = path.with_suffix(f"{path.suffix}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def link_files(source: Path, target: Path) -> None:
    """Every file of `source` into `target`, as a hard link where possible; what is there already is replaced
    (an interrupted run may have left the same files, or links to them)."""
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        dest = target / f.name
        if dest.exists() and os.path.samefile(f, dest):
            continue
        dest.unlink(missing_ok=True)
        try:
            os.link(f, dest)
        except OSError:  # another file system
            shutil.copy2(f, dest)


def code_version() -> str:
    """The package version and a hash of this package's source files: work saved by another code is never reused."""
    try:
        version = metadata.version("quantize")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = "unknown"
    digest = hashlib.sha256(version.encode())
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return f"{version}+{digest.hexdigest()[:12]}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, str(a).encode(), at_fdcwd, str(b).encode(), rename_exchange) == 0
    except (OSError, AttributeError):
        return False


class Staging:
    """`with Staging(final, force, key) as folder:` write into `folder`; on success it becomes `final`.

    The folder (`.<name>.work-<key>` beside `final`) is keyed by the run (the resolved recipe, the code version and
    the library versions): after a failure, a kill or a reboot it stays, and the next run with the same key
    continues in it (`resumed`); `restart` throws it away. Work of other keys (a changed recipe or code) and
    leftovers of dead runs are removed, never reused. A lock (`.<name>.lock`, held while the run lives, released by
    the kernel when it dies) keeps two runs from writing one output. A finished output (one with a `report.md`)
    is replaced only with `force`, and then in one step (the new folder and the old one swap places), so there is
    always an output folder."""

    def __init__(self, final: Path, force: bool, key: str = "run", restart: bool = False):
        self.final, self.force, self.restart = final, force, restart
        self.folder = final.with_name(f".{final.name}.work-{key}")
        self.lock_path = final.with_name(f".{final.name}.lock")
        self.lock = None
        self.resumed = False

    def check(self) -> None:
        if self.final.exists() and not self.force:
            finished = (self.final / FINISHED_MARKER).exists()
            what = "a finished run" if finished else "a folder that is not a finished run"
            raise QuantizeError(f"output {self.final} already exists ({what}); pass --force to replace it, "
                                "or set `output:` in the recipe")

    def _take_lock(self) -> None:
        import fcntl

        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.lock_path, "a+")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            holder = self.lock.read().strip() or "unknown"
            self.lock.close()
            self.lock = None
            raise QuantizeError(f"output {self.final} is being written by another run (process {holder}); wait for "
                                f"it to finish, or set `output:` elsewhere") from None
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(str(os.getpid()))
        self.lock.flush()

    def _stale(self) -> list[Path]:
        prefixes = (f".{self.final.name}.work-", f".{self.final.name}.partial-", f".{self.final.name}.old-")
        return [p for p in self.final.parent.iterdir() if p.name.startswith(prefixes) and p != self.folder]

    def __enter__(self) -> Path:
        self.check()
        self._take_lock()
        for stale in self._stale():  # another key (recipe or code changed) or a dead run's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        if self.restart:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.resumed = self.folder.is_dir()
        self.folder.mkdir(exist_ok=True)
        return self.folder

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._publish()
        finally:  # on failure the folder stays for the next run to continue
            self.lock_path.unlink(missing_ok=True)
            self.lock.close()
            self.lock = None

    def _publish(self) -> None:
        if not self.final.exists():
            os.replace(self.folder, self.final)
            return
        # only reachable with force: swap in one step, then remove the old output (now at self.folder)
        if not _exchange(self.folder, self.final):
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.folder, self.final)
            shutil.rmtree(old, ignore_errors=True)
            return
        shutil.rmtree(self.folder, ignore_errors=True)
