"""Fetch trained CIFAR-100 teachers into ``save/models/<arch>_vanilla/ckpt_epoch_240.pth`` and check them.

    python scripts/fetch_teachers.py                       # RepDistiller's six teachers
    python scripts/fetch_teachers.py --models resnet56 --source chenyaofo
    python scripts/fetch_teachers.py --from ../shared/teachers   # link teachers already on disk
    python scripts/fetch_teachers.py --from cifar_teachers.tar   # a manually downloaded archive

Where the files still are (RepDistiller's own server has been down since 2022, RepDistiller GitHub #47), tried in order:

1. ``mdistiller``: the ``cifar_teachers.tar`` asset of megvii-research/mdistiller's GitHub release
   ``checkpoints`` (its README, "Training on CIFAR-100"); members ``cifar_teachers/<arch>_vanilla/
   ckpt_epoch_240.pth``, RepDistiller's files unchanged.
2. ``shape2prog``: RepDistiller's original ``http://shape2prog.csail.mit.edu/repo/<arch>_vanilla/
   ckpt_epoch_240.pth`` (RepDistiller's scripts/fetch_pretrained_teachers.sh).
3. ``chenyaofo``: chenyaofo/pytorch-cifar-models' CIFAR-100 ResNet-20/32/44/56 (GitHub release ``resnet``),
   bare ``state_dict`` s whose keys are those of our ``resnet20``...``resnet56``; saved wrapped as
   ``{'model': state_dict, 'accuracy': ..., 'arch': ...}``. Trained with that project's own recipe
   (200 epochs, cosine LR), not RepDistiller's.

Each URL can be replaced by an environment variable (a mirror; tests point them at a closed port):
``KD_MDISTILLER_URL``, ``KD_SHAPE2PROG_URL``, ``KD_CHENYAOFO_URL``.

After fetching, every teacher is evaluated on the 10,000 CIFAR-100 test images and printed beside its
published accuracy; a checkpoint more than 1 point away is flagged (RepDistiller's resnet110 file is
reported at 70.27% instead of 74.31%, RepDistiller GitHub #29).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("fetch_teachers")

REPDISTILLER_TEACHERS = ("wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50")
CHENYAOFO_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56")
MODELS = REPDISTILLER_TEACHERS + ("resnet20", "resnet32", "resnet44")

MDISTILLER_URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
SHAPE2PROG_URL = "http://shape2prog.csail.mit.edu/repo"
CHENYAOFO_URL = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/resnet"
# chenyaofo's release asset names; the 8 hex digits are the start of the file's SHA-256 (torch.hub's
# check_hash convention). Accuracies: that project's README (cifar100 table), on its own normalisation.
CHENYAOFO_FILES = {
    "resnet20": ("cifar100_resnet20-23dac2f1.pt", 68.83),
    "resnet32": ("cifar100_resnet32-84213ce6.pt", 70.16),
    "resnet44": ("cifar100_resnet44-ffe32858.pt", 71.63),
    "resnet56": ("cifar100_resnet56-f2eff4c8.pt", 72.63),
}
CHECKPOINT = "ckpt_epoch_240.pth"
TOLERANCE = 1.0  # points of top-1 before a teacher is flagged


class FetchError(RuntimeError):
    """A source that cannot deliver a file (network, missing member, wrong hash)."""


def url_of(source: str) -> str:
    env, default = {
        "mdistiller": ("KD_MDISTILLER_URL", MDISTILLER_URL),
        "shape2prog": ("KD_SHAPE2PROG_URL", SHAPE2PROG_URL),
        "chenyaofo": ("KD_CHENYAOFO_URL", CHENYAOFO_URL),
    }[source]
    return os.environ.get(env) or default


def sources_for(arch: str) -> list[str]:
    """The sources that hold ``arch``, in the order they are tried."""
    order = []
    if arch in REPDISTILLER_TEACHERS:
        order += ["mdistiller", "shape2prog"]
    if arch in CHENYAOFO_FILES:
        order.append("chenyaofo")
    return order


# ----------------------------------------------------------------------------------------------------------
# Downloads


def download(url: str, dest: Path, timeout: float) -> Path:
    """Stream ``url`` to ``dest`` through a temporary file (never a half-written ``dest``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    tmp_path: Path | None = None
    try:
        with (
            urllib.request.urlopen(url, timeout=timeout) as response,
            tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp,
        ):
            tmp_path = Path(tmp.name)
            _copy_with_progress(response, tmp, int(response.headers.get("Content-Length") or 0), dest.name)
        os.replace(tmp_path, dest)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"{url}: {reason}") from None
    return dest


def _copy_with_progress(src: IO[bytes], dst: IO[bytes], total: int, name: str) -> None:
    done, step, next_report = 0, 1 << 20, 50 << 20
    while chunk := src.read(step):
        dst.write(chunk)
        done += len(chunk)
        if done >= next_report:
            log.info("%s: %d MB%s", name, done >> 20, f" of {total >> 20} MB" if total else "")
            next_report += 50 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def find_member(tar: tarfile.TarFile, arch: str) -> tarfile.TarInfo:
    """``[...]/<arch>_vanilla/ckpt_epoch_240.pth`` in an archive (mdistiller's layout, or ours)."""
    suffix = f"{arch}_vanilla/{CHECKPOINT}"
    for member in tar.getmembers():
        if member.isfile() and (member.name == suffix or member.name.endswith("/" + suffix)):
            return member
    raise FetchError(f"{tar.name} has no {suffix}")


def extract_member(archive: Path, arch: str, dest: Path) -> None:
    """Copy one checkpoint out of a tar archive (read as data: nothing else in it is extracted)."""
    with tarfile.open(archive) as tar:
        member = find_member(tar, arch)
        src = tar.extractfile(member)
        if src is None:
            raise FetchError(f"{archive}: {member.name} is not a regular file")
        _write_atomic(dest, lambda f: shutil.copyfileobj(src, f))


def _write_atomic(dest: Path, write: Any) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp:
        write(tmp)
    os.replace(tmp.name, dest)


@dataclass
class Fetched:
    arch: str
    path: Path
    source: str  # "mdistiller", "shape2prog", "chenyaofo" or "from <dir>"
    origin: str  # URL or path it came from


class Fetcher:
    """Gets each teacher from the first source that delivers it; the mdistiller archive is downloaded once."""

    def __init__(self, models_dir: Path, timeout: float, only: str | None = None) -> None:
        self.models_dir, self.timeout, self.only = models_dir, timeout, only
        self.cache = models_dir / ".downloads"
        self._archive: Path | None = None
        self._archive_error: FetchError | None = None

    def dest(self, arch: str) -> Path:
        return self.models_dir / f"{arch}_vanilla" / CHECKPOINT

    def fetch(self, arch: str) -> Fetched:
        errors = []
        for source in sources_for(arch):
            if self.only and source != self.only:
                continue
            try:
                origin = getattr(self, f"_from_{source}")(arch, self.dest(arch))
                return Fetched(arch, self.dest(arch), source, origin)
            except FetchError as exc:
                log.warning("%s from %s failed: %s", arch, source, exc)
                errors.append(f"{source}: {exc}")
        if not errors:
            raise FetchError(f"{arch} is not available from {self.only}")
        raise FetchError("; ".join(errors))

    def _from_mdistiller(self, arch: str, dest: Path) -> str:
        if self._archive is None and self._archive_error is None:
            archive = self.cache / "cifar_teachers.tar"
            try:
                self._archive = archive if archive.is_file() else download(url_of("mdistiller"), archive, self.timeout)
            except FetchError as exc:
                self._archive_error = exc  # offline: do not try six times
        if self._archive_error is not None:
            raise self._archive_error
        try:
            extract_member(self._archive, arch, dest)
        except tarfile.TarError as exc:
            raise FetchError(f"{self._archive} is not a readable tar archive ({exc}); delete it and retry") from None
        return url_of("mdistiller")

    def _from_shape2prog(self, arch: str, dest: Path) -> str:
        url = f"{url_of('shape2prog').rstrip('/')}/{arch}_vanilla/{CHECKPOINT}"
        download(url, dest, self.timeout)
        return url

    def _from_chenyaofo(self, arch: str, dest: Path) -> str:
        name, accuracy = CHENYAOFO_FILES[arch]
        url = f"{url_of('chenyaofo').rstrip('/')}/{name}"
        raw = download(url, self.cache / name, self.timeout)
        expected = name.rsplit("-", 1)[1].split(".")[0]
        if not sha256(raw).startswith(expected):
            raw.unlink()
            raise FetchError(f"{url}: SHA-256 does not start with {expected} (corrupted download)")
        wrap_state_dict(raw, dest, arch, accuracy, url)
        return url


def wrap_state_dict(raw: Path, dest: Path, arch: str, accuracy: float, url: str) -> None:
    """Save a bare ``state_dict`` in RepDistiller's teacher format, ``{'model': state_dict, ...}``.

    chenyaofo's CifarResNet names its modules like RepDistiller's resnet (``conv1``, ``bn1``,
    ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``, ``fc``), so the keys carry over
    unchanged; :func:`evaluate_teachers` loads the result with ``strict=True``.
    """
    import torch

    state = torch.load(raw, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise FetchError(f"{url} is not a bare state_dict")
    ckpt = {"model": state, "accuracy": accuracy, "arch": arch, "epoch": None, "source": url}
    _write_atomic(dest, lambda f: torch.save(ckpt, f))


def link_from(source: Path, arch: str, dest: Path, copy: bool, force: bool) -> Fetched:
    """Take ``arch`` from a folder in the ``<arch>_vanilla/ckpt_epoch_240.pth`` layout, or from a tar of it.
    A different file already at ``dest`` is kept unless ``force``."""
    if (dest.exists() or dest.is_symlink()) and not force:
        same = source.is_dir() and any(dest.resolve() == c.resolve() for c in _candidates(source, arch) if c.is_file())
        if not same:
            log.info("%s: %s already there (--force to replace)", arch, dest)
        return Fetched(arch, dest, f"from {source}" if same else "already present", str(dest.resolve()))
    if source.is_file():
        try:
            extract_member(source, arch, dest)
        except tarfile.TarError as exc:
            raise FetchError(f"{source} is not a readable tar archive ({exc})") from None
        return Fetched(arch, dest, f"from {source.name}", str(source))
    src = next((c for c in _candidates(source, arch) if c.is_file()), None)
    if src is None:
        raise FetchError(f"{source} has no {arch}_vanilla/{CHECKPOINT}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    if copy:
        _write_atomic(dest, lambda f: f.write(src.read_bytes()))
    else:
        dest.symlink_to(src.resolve())
    return Fetched(arch, dest, f"from {source}", str(src.resolve()))


def _candidates(folder: Path, arch: str) -> list[Path]:
    """Our layout and mdistiller's (``cifar_teachers/`` inside the folder)."""
    return [folder / f"{arch}_vanilla" / CHECKPOINT, folder / "cifar_teachers" / f"{arch}_vanilla" / CHECKPOINT]


def archs_in(source: Path) -> list[str]:
    """The teachers a ``--from`` folder or archive holds, in registry order."""
    if source.is_file():
        with tarfile.open(source) as tar:
            names = {m.name for m in tar.getmembers()}
        found = {a for a in MODELS if any(n.endswith(f"{a}_vanilla/{CHECKPOINT}") for n in names)}
    else:
        found = {p.parent.name.removesuffix("_vanilla") for p in source.glob(f"**/*_vanilla/{CHECKPOINT}")}
    from models import model_names

    return [a for a in model_names() if a in found]


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def reference_accuracy(arch: str, source: str, recorded: float | None) -> tuple[float | None, str]:
    """The published accuracy to compare with: chenyaofo's README for its files (and for copies of the
    architectures only it publishes), RepDistiller's README for its teachers, else what the checkpoint records."""
    from helper.published import teacher_accuracy

    repdistiller = teacher_accuracy(arch)
    if arch in CHENYAOFO_FILES and (source == "chenyaofo" or repdistiller is None):
        return CHENYAOFO_FILES[arch][1], "chenyaofo/pytorch-cifar-models README"
    if repdistiller is not None:
        return repdistiller, "RepDistiller README (teacher)"
    if recorded is not None:
        return recorded, "recorded in the checkpoint"
    return None, ""


def evaluate_teachers(fetched: list[Fetched], data_folder: str | None, device_name: str | None) -> list[dict]:
    import torch

    from dataset import DeviceLoader, load_cifar100, resolve_data_folder
    from helper.checkpoint import load_teacher
    from helper.engine import Precision, evaluate

    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_cifar100(resolve_data_folder(data_folder))
    # Small batches evaluate faster on CPUs (activations stay in cache); large ones keep a GPU busy.
    loader = DeviceLoader(
        data.test_images, data.test_labels, 100 if device.type == "cpu" else 1000, device, train=False
    )
    rows = []
    for item in fetched:
        model, arch, ckpt = load_teacher(str(item.path), item.arch, num_classes=100)
        model.to(device)
        acc = evaluate(model, loader, Precision("none", device.type), device)["acc"]
        recorded = ckpt.get("accuracy")
        recorded = float(recorded) if isinstance(recorded, int | float) or torch.is_tensor(recorded) else None
        published, reference = reference_accuracy(arch, item.source, recorded)
        rows.append(
            {
                "arch": arch, "path": str(item.path), "source": item.source, "origin": item.origin,
                "measured": acc, "published": published, "reference": reference, "recorded": recorded,
                "flagged": published is not None and abs(acc - published) > TOLERANCE,
            }
        )  # fmt: skip
        log.info("%s: %.2f%% on %d test images", arch, acc, len(data.test_labels))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'teacher':<12} {'measured':>8} {'published':>9} {'diff':>6}  reference / source")
    for r in rows:
        pub = f"{r['published']:.2f}" if r["published"] is not None else "-"
        diff = f"{r['measured'] - r['published']:+.2f}" if r["published"] is not None else "-"
        flag = f"   <-- more than {TOLERANCE:g} point off" if r["flagged"] else ""
        print(f"{r['arch']:<12} {r['measured']:>8.2f} {pub:>9} {diff:>6}  {r['reference']} / {r['source']}{flag}")


def write_provenance(rows: list[dict]) -> None:
    """``fetch.json`` beside each checkpoint: where it came from, its SHA-256 and the accuracy measured here."""
    for r in rows:
        path = Path(r["path"])
        info = {**r, "sha256": sha256(path.resolve())}
        (path.parent / "fetch.json").write_text(json.dumps(info, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fetch trained CIFAR-100 teachers into save/models/<arch>_vanilla/ckpt_epoch_240.pth "
        "and evaluate them on the test set.",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None, metavar="ARCH",
                        help=f"teachers to fetch, of {' '.join(MODELS)} (default: RepDistiller's six; "
                        "with --from: every teacher found there)")  # fmt: skip
    parser.add_argument("--source", choices=["mdistiller", "shape2prog", "chenyaofo"], default=None,
                        help="use only this source (default: try them in order)")  # fmt: skip
    parser.add_argument("--from", dest="from_path", type=Path, default=None,
                        help="take the teachers from this folder (<arch>_vanilla/ckpt_epoch_240.pth) or tar archive "
                        "instead of downloading them")  # fmt: skip
    parser.add_argument("--copy", action="store_true", help="with --from: copy the files instead of linking them")
    parser.add_argument("--save_dir", type=Path, default=Path("save"), help="root of save/models (default ./save)")
    parser.add_argument("--force", action="store_true", help="replace teachers that are already there")
    parser.add_argument("--no_eval", action="store_true", help="do not evaluate the teachers")
    parser.add_argument("--data_folder", default=None, help="CIFAR-100 root (default: $CIFAR100_ROOT, else ./data)")
    parser.add_argument("--device", default=None, help="evaluation device (default: cuda if available)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a connection is given up")
    return parser.parse_args(argv)


def gather(args: argparse.Namespace) -> Iterator[Fetched | FetchError]:
    models_dir = args.save_dir / "models"
    if args.from_path is not None:
        if not args.from_path.exists():
            yield FetchError(f"--from {args.from_path}: no such file or folder")
            return
        for arch in args.models or archs_in(args.from_path):
            try:
                dest = models_dir / f"{arch}_vanilla" / CHECKPOINT
                yield link_from(args.from_path, arch, dest, args.copy, args.force)
            except FetchError as exc:
                yield exc
        return
    fetcher = Fetcher(models_dir, args.timeout, args.source)
    for arch in args.models or REPDISTILLER_TEACHERS:
        dest = fetcher.dest(arch)
        if dest.exists() and not args.force:
            log.info("%s: %s already there (--force to replace)", arch, dest)
            yield Fetched(arch, dest, "already present", str(dest))
            continue
        try:
            yield fetcher.fetch(arch)
        except FetchError as exc:
            yield FetchError(f"{arch}: {exc}")


def main(argv: list[str] | None = None) -> int:
    # Read by OpenMP when torch loads (below, lazily): spinning threads starve each other on shared cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run as `python scripts/fetch_teachers.py`: the project's packages
    args = parse_args(argv)
    fetched, failed = [], []
    for item in gather(args):
        (failed if isinstance(item, FetchError) else fetched).append(item)
    if failed:
        where = "--from " + str(args.from_path) if args.from_path else "any source"
        log.error(
            "could not get %d teacher(s) from %s: %s. Without internet access, download cifar_teachers.tar "
            "(%s) elsewhere and pass it with --from, or point KD_MDISTILLER_URL / KD_SHAPE2PROG_URL / "
            "KD_CHENYAOFO_URL at a mirror.",
            len(failed), where, " | ".join(str(e) for e in failed), MDISTILLER_URL,
        )  # fmt: skip
        return 1
    for item in fetched:
        log.info("%s -> %s (%s)", item.arch, item.path, item.source)
    if args.no_eval or not fetched:
        return 0
    from dataset import DataError
    from helper.checkpoint import CheckpointError

    try:
        rows = evaluate_teachers(fetched, args.data_folder, args.device)
    except (DataError, CheckpointError) as exc:
        log.error("error: %s (the files are in place; --no_eval skips this check)", exc)
        return 2
    print_table(rows)
    write_provenance(rows)
    flagged = [r["arch"] for r in rows if r["flagged"]]
    if flagged:
        log.warning("%s: more than %g point from the published accuracy; check these files", flagged, TOLERANCE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
