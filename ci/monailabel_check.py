"""Serve the BTCV bundle with a real MONAI Label 0.8.5 server and segment the shared CT slab through it.

What it does, in order (every step bounded in time; the server is always stopped):

1. builds the MONAI Label virtual environment at ``--venv`` (default ``<repo>/.venv-monailabel``), or
   reuses it when its stamp file says the build completed. MONAI Label needs its own environment: it
   pins ``numpy<2``, which the project's environment (numpy 2) must not get. Recipe (see
   ``shared/FACTS.md``): ``torch==2.14.1 torchvision==0.29.1`` first (torchvision 0.29 does not import
   beside torch 2.13), then ``monailabel==0.8.5`` under a constraint file that also pins ``pydicom``,
   ``dicomweb-client`` and ``pynetdicom`` (newer releases break pydicom-seg or each other), with
   ``SAM2_BUILD_CUDA=0``;
2. trains a tiny model (feature_size 12, 64^3, 3 mm, 1 epoch of 1 step) with the project's own
   environment through ``python -m monai.bundle run training`` on the sample dataset;
3. assembles a ``monaibundle`` app in a temporary folder: the sample app from the MONAI Label package,
   a stand-alone copy of ``swin_unetr_btcv`` (links followed) under ``model/swin_unetr_btcv/`` with
   that ``models/model.pt``, its configs untouched: the recipe saved in ``model.pt`` (``custom.networks.recipe``)
   gives MONAI Label the tiny model's feature_size, ROI and spacing, nothing is retyped by hand;
4. starts ``monailabel start_server`` (as ``<venv>/bin/python -m monailabel.main``, see ``Server.start``)
   on 127.0.0.1 with a free port, no network needed
   (``--conf zoo_source github`` and ``BUNDLE_DOWNLOAD_SRC=github``: the default zoo source is
   queried over the internet even for a local bundle), and waits for ``/info/``;
5. checks that ``/info/`` lists the bundle's model with the organ names of ``configs/metadata.json``
   (as MONAI Label reports them: lower case, background left out), then sends
   ``POST /infer/swin_unetr_btcv?image=ct_slab&output=image``; MONAI Label must have loaded
   ``models/model.pt`` whole (it loads non-strict and only warns otherwise); stops the server;
6. segments the slab with the bundle's own ``run inference`` on the same copy and checks the served
   NIfTI label map: the slab's shape and grid, values only in 0..13, the same labels as the bundle's
   own output (at least 99.9 % of the voxels; 100 % measured);
7. prints a short report with timings and exits 0, or exits 1 with the reason (and the server log's
   tail when the server is involved).

Usage (from anywhere; the orchestration is standard library only)::

    python3 ci/monailabel_check.py                 # build or reuse the environment, then check
    python3 ci/monailabel_check.py --skip-build    # require a complete environment, do not build
    python3 ci/monailabel_check.py --build-only    # only build the environment
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "swin_unetr_btcv"
BUNDLE_NAME = "swin_unetr_btcv"
SAMPLE_DIR = REPO.parent / "shared" / "data" / "ct_sample"
STUDY_ID = "ct_slab"

MONAILABEL_VERSION = "0.8.5"
#: installed first, on their own (local files on the project's machines)
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
#: constraints for ``pip install monailabel``: keep torch, and the DICOM stack versions that work together
CONSTRAINTS = TORCH_PINS + ["pydicom==2.4.4", "dicomweb-client==0.59.1", "pynetdicom==2.0.2"]
STAMP_NAME = ".monailabel-check-complete"
#: MONAI Label 0.8.5's warning (``BasicInferTask._get_network``) when a checkpoint's keys differ from the network's
WEIGHTS_MISMATCH = "Checkpoint keys don't match"
#: fraction of voxels on which the served label map must equal the bundle's own ``run inference`` output
#: (1.0 measured; the margin is for argmax ties that float rounding may break differently)
MIN_AGREEMENT = 0.999

#: the tiny model: the demo's sizes (``bundles/demo.py`` ``DEMO_OVERRIDES``), given to training only; the
#: recipe saved in ``model.pt`` carries them to the server and to the bundle's own ``run inference``
TINY_SIZES = {"feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [3.0, 3.0, 3.0]}
#: a run-time choice, not part of the recipe: MONAI Label runs the network in float32, so the bundle's own
#: ``run inference`` does too for the comparison
INFERENCE_RUNTIME = {"amp": False, "num_workers": 0}
#: training of the tiny model: 1 epoch of 1 step, one crop, validation at its end (writes models/model.pt)
TINY_TRAINING = {
    **TINY_SIZES,
    "amp": False,
    "num_workers": 0,
    "use_checkpoint": False,
    "max_epochs": 1,
    "epoch_length": 1,
    "val_interval": 1,
    "num_samples": 1,
    "warmup_epochs": 0,
    "resume": False,
}


class CheckFailedError(Exception):
    """A step of the check failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"[monailabel-check] {msg}", flush=True)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run(cmd: list[str], what: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion within ``timeout`` s; raise ``CheckFailedError`` with the output tail otherwise."""
    try:
        proc = subprocess.run(
            [str(c) for c in cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            **kw,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode("utf-8", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise CheckFailedError(f"{what}: timed out after {timeout:.0f} s\n{tail(out)}") from None
    if proc.returncode != 0:
        raise CheckFailedError(
            f"{what}: exit status {proc.returncode}\n$ {' '.join(map(str, cmd))}\n{tail(proc.stdout)}"
        )
    return proc


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without Python/venv variables that would leak one environment into another."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------
# 1. the MONAI Label environment


def default_venv() -> Path:
    """``$MONAILABEL_VENV`` when set, else ``<repo>/.venv-monailabel``."""
    return Path(os.environ.get("MONAILABEL_VENV") or REPO / ".venv-monailabel")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_complete(venv: Path) -> bool:
    """True when a previous build of ``venv`` finished (stamp written last) and its launcher is there."""
    return (venv / STAMP_NAME).is_file() and (venv / "bin" / "monailabel").is_file() and venv_python(venv).exists()


def build_venv(venv: Path, base_python: str, timeout: float) -> None:
    """Create ``venv`` and install MONAI Label into it; the stamp file is written only on success."""
    stamp = venv / STAMP_NAME
    if stamp.exists():
        stamp.unlink()
    log(f"building the MONAI Label environment in {venv} (several minutes)")
    run([base_python, "-m", "venv", "--clear", venv], "creating the virtual environment", 300)
    py = venv_python(venv)
    env = clean_env(SAM2_BUILD_CUDA="0")
    run([py, "-m", "pip", "install", "--quiet", *TORCH_PINS], "installing torch and torchvision", timeout, env=env)
    constraints = venv / "monailabel-constraints.txt"
    constraints.write_text("\n".join(CONSTRAINTS) + "\n", encoding="utf-8")
    run(
        [py, "-m", "pip", "install", "--quiet", "-c", constraints, f"monailabel=={MONAILABEL_VERSION}"],
        "installing monailabel",
        timeout,
        env=env,
    )
    probe = (
        "import json, monai, monailabel, numpy, torch, torchvision; "
        "print(json.dumps({m.__name__: m.__version__ for m in (monailabel, monai, torch, torchvision, numpy)}))"
    )
    versions = json.loads(run([py, "-c", probe], "importing monailabel", 300, env=env).stdout.strip().splitlines()[-1])
    if versions["monailabel"] != MONAILABEL_VERSION:
        raise CheckFailedError(f"the environment holds monailabel {versions['monailabel']}, not {MONAILABEL_VERSION}")
    stamp.write_text(json.dumps(versions, indent=4) + "\n", encoding="utf-8")
    log(f"environment complete: {versions}")


def find_sample_app(venv: Path) -> Path:
    """The ``monaibundle`` sample app shipped with the installed monailabel package."""
    hits = sorted(venv.glob("**/sample-apps/monaibundle/main.py"))
    if not hits:
        raise CheckFailedError(f"no sample-apps/monaibundle/main.py under {venv}: is monailabel installed there?")
    return hits[0].parent


# ---------------------------------------------------------------------------------------------------
# 2. the tiny model, trained with the project's environment


def cli_args(overrides: dict) -> list[str]:
    """``{"roi_size": [64, 64, 64]}`` -> ``["--roi_size", "[64, 64, 64]"]`` (as ``bundles.demo.cli_args``)."""
    args: list[str] = []
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else repr(v)]
    return args


def train_tiny_model(project_python: str, work: Path, timeout: float) -> Path:
    """Sample dataset + ``run training`` for 1 step in the bundle folder; returns the trained ``model.pt``."""
    env = clean_env()
    dataset = work / "dataset"
    prep = (
        "import sys; from bundles.sample_data import prepare_sample_dataset; "
        "prepare_sample_dataset(sys.argv[1], sys.argv[2])"
    )
    run([project_python, "-c", prep, dataset, SAMPLE_DIR], "preparing the sample dataset", 300, cwd=REPO, env=env)
    overrides = {
        "dataset_dir": str(dataset),
        "ckpt_dir": str(work / "train" / "models"),
        "output_dir": str(work / "train" / "outputs"),
        **TINY_TRAINING,
    }
    cmd = [project_python, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json"]
    run(cmd + cli_args(overrides), "training the tiny model", timeout, cwd=BUNDLE, env=env)
    model = work / "train" / "models" / "model.pt"
    if not model.is_file():
        raise CheckFailedError(f"training finished but wrote no {model}")
    return model


# ---------------------------------------------------------------------------------------------------
# 3. the app


def recipe_of(project_python: str, model: Path) -> dict:
    """The recipe saved in ``model`` (``{"model": ..., "recipe": ...}``), read by the project's environment."""
    code = "import json, sys, torch; print(json.dumps(torch.load(sys.argv[1], weights_only=True).get('recipe')))"
    out = run([project_python, "-c", code, model], "reading the recipe of model.pt", 120, env=clean_env())
    recipe = json.loads(out.stdout.strip().splitlines()[-1])
    if not isinstance(recipe, dict):
        raise CheckFailedError(f"{model} carries no recipe: MONAI Label would serve it with the config's sizes")
    return recipe


def assemble_app(venv: Path, model: Path, work: Path, project_python: str) -> tuple[Path, Path]:
    """``work/app`` (monaibundle + a stand-alone bundle copy with the tiny model) and ``work/studies``."""
    app = work / "app"
    shutil.copytree(find_sample_app(venv), app, ignore=shutil.ignore_patterns("__pycache__"))
    dst = app / "model" / BUNDLE_NAME
    # copytree follows symlinks by default: custom -> ../custom becomes a real folder
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("__pycache__", "models", "outputs", "eval", "*.pyc"))
    if (dst / "custom").is_symlink() or not (dst / "custom" / "data" / "transforms.py").is_file():
        raise CheckFailedError(f"{dst / 'custom'} is not a real copy of custom/")
    (dst / "models").mkdir()
    shutil.copy2(model, dst / "models" / "model.pt")
    recipe = recipe_of(project_python, dst / "models" / "model.pt")
    wrong = {k: (recipe.get(k), v) for k, v in TINY_SIZES.items() if recipe.get(k) != v}
    if wrong:
        raise CheckFailedError(f"{model}: the saved recipe does not hold the trained sizes (saved, trained): {wrong}")
    studies = work / "studies"
    studies.mkdir()
    shutil.copy2(SAMPLE_DIR / f"{STUDY_ID}.nii.gz", studies / f"{STUDY_ID}.nii.gz")
    return app, studies


# ---------------------------------------------------------------------------------------------------
# 4-5. the server and the requests


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``monailabel start_server`` in its own process group, its output in ``log_path``; ``stop()`` always works."""

    def __init__(self, venv: Path, app: Path, studies: Path, work: Path, port: int) -> None:
        self.venv, self.app, self.studies, self.work, self.port = venv, app, studies, work, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = work / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        bin_dir = self.venv / "bin"
        env = clean_env(
            PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            VIRTUAL_ENV=str(self.venv),
            BUNDLE_DOWNLOAD_SRC="github",
            no_proxy="127.0.0.1,localhost",
            NO_PROXY="127.0.0.1,localhost",
        )
        # What the ``monailabel`` launcher runs (``python -m monailabel.main``), without the launcher's
        # ``PYTHONPATH=<venv>/../..``: for the default venv that is this repository, and the app must stand alone.
        cmd = [
            bin_dir / "python", "-m", "monailabel.main", "start_server",
            "--app", self.app, "--studies", self.studies,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--conf", "models", BUNDLE_NAME,
            "--conf", "zoo_source", "github",
            "--conf", "sam2", "false",
        ]  # fmt: skip
        self._log = open(self.log_path, "w", encoding="utf-8")
        self._log.write("$ " + " ".join(map(str, cmd)) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=self.work, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def log_tail(self, lines: int = 60) -> str:
        try:
            return tail(self.log_path.read_text(encoding="utf-8", errors="replace"), lines)
        except OSError:
            return "(no server log)"

    def fail(self, msg: str) -> CheckFailedError:
        return CheckFailedError(f"{msg}\n--- last lines of the server log ({self.log_path}) ---\n{self.log_tail()}")

    def wait_ready(self, timeout: float) -> dict:
        """Poll ``/info/`` until it answers (returns its JSON), the server exits, or ``timeout`` s pass."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise self.fail(f"the server exited with status {self.proc.returncode} before answering /info/")
            try:
                with urllib.request.urlopen(f"{self.url}/info/", timeout=10) as r:
                    return json.loads(r.read().decode("utf-8"))
            except (urllib.error.URLError, ConnectionError, socket.timeout, json.JSONDecodeError) as e:
                last = repr(e)
            time.sleep(2)
        raise self.fail(f"/info/ did not answer within {timeout:.0f} s (last error: {last})")

    def infer(self, model: str, image: str, timeout: float) -> bytes:
        """``POST /infer/<model>?image=<id>&output=image`` (multipart, empty params); returns the body."""
        boundary = uuid.uuid4().hex
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{}}\r\n--{boundary}--\r\n'
        ).encode()
        req = urllib.request.Request(
            f"{self.url}/infer/{model}?image={image}&output=image",
            data=body,
            method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[-2000:]
            raise self.fail(f"POST /infer/{model}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, socket.timeout) as e:
            raise self.fail(f"POST /infer/{model}: no answer within {timeout:.0f} s ({e!r})") from None

    def stop(self, grace: float = 20) -> bool:
        """SIGTERM to the server's process group (it spawns its own workers), SIGKILL after ``grace`` s.

        Returns False when there was nothing to stop (never started, or already stopped).
        """
        if self.proc is None or self._log.closed:
            return False
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # workers left in the group after the launcher itself exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        return True


def expected_labels() -> dict[str, int]:
    """Organ name -> index from the bundle's metadata (``channel_def`` of the ``pred`` output)."""
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text(encoding="utf-8"))
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {name: int(i) for i, name in channel_def.items()}


def check_info(info: dict) -> dict:
    """The model entry of ``/info/`` for the bundle; its labels must be metadata's organ names, exactly.

    MONAI Label 0.8.5 (``BundleInferTask``) reports a segmentation bundle's labels as ``{name.lower(): index}``
    from ``channel_def``, without ``background``: the expected value is built the same way.
    """
    models = info.get("models", {})
    if BUNDLE_NAME not in models:
        raise CheckFailedError(f"/info/ lists models {sorted(models)}, not {BUNDLE_NAME}")
    entry = models[BUNDLE_NAME]
    want = {name.lower(): i for name, i in expected_labels().items() if name.lower() != "background"}
    got = entry.get("labels")
    if got != want:
        raise CheckFailedError(f"/info/ labels of {BUNDLE_NAME}:\n  got      {got}\n  expected {want}")
    return entry


def compare_label_maps(project_python: str, pred: Path, image: Path, reference: Path) -> dict:
    """Shape, grid and values of the served label map ``pred`` against the ``image`` it segments and the
    bundle's own ``run inference`` output ``reference`` (read with nibabel in the project's environment)."""
    code = """
import json, sys
import nibabel, numpy
pred, image, ref = (nibabel.load(p) for p in sys.argv[1:4])
a, r = numpy.asarray(pred.dataobj), numpy.asarray(ref.dataobj)
print(json.dumps({
    "shape": list(a.shape), "image_shape": list(image.shape), "dtype": str(a.dtype),
    "values": sorted(float(v) for v in numpy.unique(a)),
    "same_grid": bool(numpy.allclose(pred.affine, image.affine, atol=1e-3)),
    "agreement": float((a == r).mean()) if a.shape == r.shape else None,
}))
"""
    out = run([project_python, "-c", code, pred, image, reference], "comparing the label maps", 120, env=clean_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def bundle_inference(project_python: str, bundle: Path, studies: Path, out_dir: Path, timeout: float) -> Path:
    """The same segmentation through the bundle's own ``run inference`` on the app's copy (same configs, weights)."""
    cmd = [project_python, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json"]
    cmd += cli_args({"input_dir": str(studies), "output_dir": str(out_dir), **INFERENCE_RUNTIME})
    run(cmd, "the bundle's own run inference", timeout, cwd=bundle, env=clean_env())
    seg = out_dir / f"{STUDY_ID}_seg.nii.gz"
    if not seg.is_file():
        raise CheckFailedError(f"run inference wrote no {seg}")
    return seg


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--venv",
        type=Path,
        default=default_venv(),
        help="the MONAI Label environment (default: $MONAILABEL_VENV, else <repo>/.venv-monailabel)",
    )
    p.add_argument("--skip-build", action="store_true", help="fail unless --venv is already complete")
    p.add_argument("--build-only", action="store_true", help="build (or reuse) the environment, nothing else")
    p.add_argument("--rebuild", action="store_true", help="build the environment even if it is complete")
    p.add_argument("--base-python", default=sys.executable, help="interpreter the environment is made from")
    p.add_argument("--project-python", default=str(REPO / ".venv" / "bin" / "python"), help="the project's environment")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: temp, removed)")
    p.add_argument("--build-timeout", type=float, default=1800, help="seconds per pip install")
    p.add_argument("--train-timeout", type=float, default=900)
    p.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for /info/")
    p.add_argument("--infer-timeout", type=float, default=900)
    args = p.parse_args(argv)
    venv = args.venv.absolute()
    timings: dict[str, str] = {}
    server: Server | None = None
    work_ctx = None
    try:
        # 1. environment
        t0 = time.monotonic()
        if venv_complete(venv) and not args.rebuild:
            timings["venv build"] = "reused (complete)"
        elif args.skip_build:
            raise CheckFailedError(f"MONAI Label environment absent or incomplete at {venv}: run make test-monailabel")
        else:
            build_venv(venv, args.base_python, args.build_timeout)
            timings["venv build"] = f"{time.monotonic() - t0:.0f} s"
        if args.build_only:
            log(f"environment ready: {venv}")
            return 0
        if not Path(args.project_python).exists():
            raise CheckFailedError(f"the project's environment is missing ({args.project_python}): run make setup")
        for need in (SAMPLE_DIR / f"{STUDY_ID}.nii.gz", BUNDLE / "configs" / "metadata.json"):
            if not need.is_file():
                raise CheckFailedError(f"missing {need}")

        if args.keep:
            work = args.keep.absolute()
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
        else:
            work_ctx = tempfile.TemporaryDirectory(prefix="monailabel_check_")
            work = Path(work_ctx.name)

        # 2. tiny model
        t0 = time.monotonic()
        log("training the tiny model (feature_size 12, 1 step) with the project's environment")
        model = train_tiny_model(args.project_python, work, args.train_timeout)
        timings["tiny model training"] = f"{time.monotonic() - t0:.0f} s"

        # 3. app
        app, studies = assemble_app(venv, model, work, args.project_python)
        log(f"app assembled in {app}")

        # 4. server
        server = Server(venv, app, studies, work, free_port())
        t0 = time.monotonic()
        log(f"starting the server on {server.url} (log: {server.log_path})")
        server.start()
        info = server.wait_ready(args.start_timeout)
        timings["server start (until /info/ answers)"] = f"{time.monotonic() - t0:.0f} s"
        entry = check_info(info)
        log(f"/info/ lists {BUNDLE_NAME} with labels {entry['labels']}")

        # 5. inference
        t0 = time.monotonic()
        log(f"POST /infer/{BUNDLE_NAME}?image={STUDY_ID}&output=image")
        body = server.infer(BUNDLE_NAME, STUDY_ID, args.infer_timeout)
        timings["inference request"] = f"{time.monotonic() - t0:.0f} s"
        pred = work / "pred.nii.gz"
        pred.write_bytes(body)
        if body[:2] != b"\x1f\x8b" and body[344:348] not in (b"n+1\x00", b"ni1\x00"):
            raise server.fail(f"the inference answer is not a NIfTI file ({len(body)} bytes: {body[:200]!r})")
        # MONAI Label loads weights non-strict and only warns when the checkpoint's keys differ
        if WEIGHTS_MISMATCH in server.log_path.read_text(encoding="utf-8", errors="replace"):
            raise server.fail("MONAI Label did not load models/model.pt whole (checkpoint keys differ)")
        server.stop()
        log("server stopped")

        # 6. the same request through the bundle itself: the served answer must be the bundle's answer
        t0 = time.monotonic()
        log("segmenting the slab with the bundle's own run inference (same copy, same weights) to compare")
        studies_ref = work / "bundle_input"
        studies_ref.mkdir()
        shutil.copy2(studies / f"{STUDY_ID}.nii.gz", studies_ref / f"{STUDY_ID}.nii.gz")
        ref = bundle_inference(
            args.project_python, app / "model" / BUNDLE_NAME, studies_ref, work / "bundle_output", args.infer_timeout
        )
        timings["bundle run inference (comparison)"] = f"{time.monotonic() - t0:.0f} s"
        got = compare_label_maps(args.project_python, pred, SAMPLE_DIR / f"{STUDY_ID}.nii.gz", ref)
        if got["shape"] != got["image_shape"]:
            raise CheckFailedError(f"label map shape {got['shape']} differs from the slab's {got['image_shape']}")
        if not got["same_grid"]:
            raise CheckFailedError("the label map's affine differs from the slab's: not on the input's grid")
        bad = [v for v in got["values"] if v != int(v) or not 0 <= v <= 13]
        if bad:
            raise CheckFailedError(f"label map holds values outside 0..13: {bad}")
        if got["agreement"] is None or got["agreement"] < MIN_AGREEMENT:
            raise CheckFailedError(
                f"the served label map agrees with the bundle's own run inference on {got['agreement']} of the voxels "
                f"(at least {MIN_AGREEMENT} expected: same configs, same weights)"
            )
        found = [int(v) for v in got["values"]]
    except CheckFailedError as e:
        print(f"\nMONAI Label check FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nMONAI Label check interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        if server is not None and server.stop():
            log("server stopped")
        if work_ctx is not None:
            work_ctx.cleanup()

    names = {i: n for n, i in expected_labels().items()}
    print("\nMONAI Label check passed")
    print(f"  monailabel {MONAILABEL_VERSION} in {venv}")
    print(f"  /info/ labels of {BUNDLE_NAME}: {entry['labels']}")
    print(
        f"  label map {got['shape']} ({got['dtype']}) on the slab's grid; labels present: "
        f"{', '.join(f'{v} {names[v]}' for v in found)}"
    )
    print(f"  agreement with the bundle's own run inference: {got['agreement']:.4%} of voxels")
    for k, v in timings.items():
        print(f"  {k:<38} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
