"""Hostile inputs to every entry point: bad configs, data, checkpoints, output folders, model files and
command lines. Each must stop with exit code 2 and exactly one `error:` line on stderr that names the
culprit (no traceback, no other line but known harmless ones), leave every file under the case's root as it was
(but those a case may add: a run's new output folder), and write none of the paths the case names.

Most cases run the entry script in this process (`runpy`, as `python SCRIPT ARGS` would run it: a Python
start costs 5-10 s here); a few run as real processes where the process boundary is the point (launch.sh,
several ranks, another process holding the run folder's lock).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import ROOT, free_port, run_in_process, run_script, save_toy_student

TOY = str(ROOT / "configs" / "toy.yaml")
LORA_TOY = str(ROOT / "configs" / "lora_toy.yaml")
PORTRAIT_TOY = str(ROOT / "configs" / "portrait_toy.yaml")
# Tiny settings for every trainer case: a case that is wrongly accepted still ends in seconds.
TINY = ["train.max_steps=2", "train.sample_every=0", "log.trackers=[none]", "data.num_samples=8",
        "train.batch_size=2", "data.resolution=32"]
LOCK = ".lock"
# SDKD_HOSTILE_SUBPROCESS=1 runs every case as a real process (minutes): checks that the in-process runner
# sees what a user's terminal would.
ALL_AS_PROCESSES = os.environ.get("SDKD_HOSTILE_SUBPROCESS") == "1"

# Lines a failing entry point may print besides its `error:` line: sdkd's own warnings (skipped samples,
# passed-over checkpoints) and progress or notices that are known to be harmless.
HARMLESS = [
    re.compile(r"^warning: "),
    re.compile(r"^note: "),
]


# ---------------------------------------------------------------------------------------------
# Workspace: the user's disk as a case finds it


def png(seed: int = 0, size: tuple[int, int] = (40, 40)) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def fake_finished_run(folder: Path) -> Path:
    """What a finished run leaves, as far as the run folder's checks see it (no weights)."""
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"step": 2, "files": {}}))
    (folder / "config.yaml").write_text(f"teacher: toy\noutput_dir: {folder}\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    (folder / "student").mkdir()
    (folder / "student" / "README.md").write_text("# my student\n")
    return folder


def make_workspace(root: Path) -> Path:
    """ROOT/ws with precious user files and a finished run; ROOT/tmp is the cases' temporary folder."""
    ws = root / "ws"
    (ws / "precious").mkdir(parents=True)
    (ws / "precious" / "thesis.tex").write_text("\\section{Five years of work}\n")
    (ws / "precious" / "holiday.png").write_bytes(png(7))
    fake_finished_run(ws / "old_run")
    (root / "tmp").mkdir()
    return ws


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes, but run-folder locks and the temporary folder."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK and p.relative_to(root).parts[0] != "tmp"}


def assert_unchanged(before: dict[str, bytes], after: dict[str, bytes], may_add: tuple[str, ...] = ()) -> None:
    lost = sorted(set(before) - set(after))
    added = sorted(set(after) - set(before) - set(may_add))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (lost or added or changed), f"disk changed: lost {lost}, added {added}, changed {changed}"


# ---------------------------------------------------------------------------------------------
# Running an entry point


# ---------------------------------------------------------------------------------------------
# Assets built once per module (lazily: `-k` on one case builds only what it needs)


class Assets:
    def __init__(self, folder: Path, teacher_dir: Path):
        self.folder, self.teacher_dir = folder, teacher_dir

    @functools.cached_property
    def run(self) -> Path:
        """A real finished toy run (train/kd.py, 2 steps): config.yaml, metrics.jsonl, checkpoint-2, student/."""
        out = self.folder / "run"
        code = run_in_process("train/kd.py", ["--config", TOY, f"output_dir={out}", "train.checkpoint_every=0",
                                              *TINY])
        assert code == 0 and (out / "checkpoint-2" / "trainer_state.json").is_file(), code
        return out

    @functools.cached_property
    def student(self) -> Path:
        """A toy bk_small student pipeline folder (what train/kd.py leaves in OUTPUT/student)."""
        return save_toy_student(self.folder / "student_bk_small", "bk_small")

    @functools.cached_property
    def single_file(self) -> Path:
        """The bk_small toy student as an sdkd single file (--format single-file, ldm numbering)."""
        from sdkd.train.formats.model_files import export_single_file, load_source

        return export_single_file(load_source(self.student), self.folder / "student.safetensors")

    @functools.cached_property
    def pickle_teacher(self) -> Path:
        """The toy teacher with .bin (pickle) weights only, as old hub checkpoints are."""
        import torch
        from safetensors.torch import load_file

        from sdkd.train.models.toy import build_toy_pipeline

        folder = self.folder / "pickled_teacher"
        build_toy_pipeline().save_pretrained(folder, safe_serialization=False)
        for st in folder.rglob("*.safetensors"):  # transformers 5 writes safetensors whatever it is asked
            torch.save(load_file(st), st.with_name("pytorch_model.bin"))
            st.unlink()
        assert not list(folder.rglob("*.safetensors"))
        return folder

    @functools.cached_property
    def teacher_lora(self) -> Path:
        """A LoRA trained on the toy teacher's full layout (it adapts modules a bk_small student lacks)."""
        from sdkd.train.formats import lora_io
        from sdkd.train.formats.lora_config import LoraSection
        from sdkd.train.models.toy import build_toy_pipeline

        pipe = build_toy_pipeline()
        lora_io.add_adapters(pipe.unet, None, LoraSection(rank=2))
        return lora_io.save_lora(self.folder / "teacher_lora", pipe.unet, None, base="toy")

    @functools.cached_property
    def student_lora(self) -> Path:
        """A LoRA trained on the bk_small toy student: every module it adapts also exists in the teacher."""
        from sdkd.train.formats import lora_io
        from sdkd.train.formats.lora_config import LoraSection
        from sdkd.train.models.teacher import load_teacher

        unet = load_teacher(str(self.student)).unet
        lora_io.add_adapters(unet, None, LoraSection(rank=2))
        return lora_io.save_lora(self.folder / "student_lora", unet, None, base="the bk_small toy student")

    @functools.cached_property
    def cache(self) -> Path:
        """A latent cache of 8 synthetic samples made with the toy teacher (train/cache_latents.py)."""
        out = self.folder / "cache"
        assert run_in_process("train/cache_latents.py", ["--config", TOY, *TINY, f"data.cache={out}"]) == 0
        return out

    @functools.cached_property
    def shards(self) -> Path:
        """One good webdataset shard of 8 captioned JPEGs, with its manifest."""
        import webdataset as wds

        folder = self.folder / "shards"
        folder.mkdir()
        with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=8, verbose=0) as writer:
            for i in range(8):
                writer.write({"__key__": f"s{i:04d}", "jpg": jpeg(i), "txt": f"sample {i}"})
        (folder / "manifest.json").write_text(json.dumps({"samples": 8, "shards": [{"name": "shard-000000.tar",
                                                                                    "samples": 8}]}))
        return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory, toy_teacher_dir) -> Assets:
    return Assets(tmp_path_factory.mktemp("assets"), toy_teacher_dir)


# ---------------------------------------------------------------------------------------------
# Case helpers


@dataclass
class Ctx:
    """What a case's setup gets: its workspace, the case root (ws's parent, also holding tmp/) and assets."""

    ws: Path
    root: Path
    assets: Assets
    holder: subprocess.Popen | None = None
    absent: list[Path] = field(default_factory=list)  # must not exist after the case
    monkeypatch: pytest.MonkeyPatch | None = None  # the case's environment (HOME, the hub's settings)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def kd(*overrides: str, config: str | None = TOY, out: str = "{ws}/out") -> Callable[[Ctx], list[str]]:
    """train/kd.py with the toy recipe, tiny settings and OUTPUT = ws/out (new) unless given."""

    def argv(c: Ctx) -> list[str]:
        fmt = lambda s: s.format(ws=c.ws, root=c.root)  # noqa: E731
        return (["--config", fmt(config)] if config else []) + [f"output_dir={fmt(out)}", *TINY,
                                                                  *map(fmt, overrides)]

    return argv


def config_file(text: str | bytes, name: str = "recipe.yaml", *overrides: str) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        path = write(c.ws / name, text)
        return ["--config", str(path), f"output_dir={c.ws / 'out'}", *overrides]

    return argv


def with_run(*overrides: str, damage: Callable[[Path], None] | None = None) -> Callable[[Ctx], list[str]]:
    """A copy of the real finished run at ws/run, damaged by `damage`, and train/kd.py pointed at it."""

    def argv(c: Ctx) -> list[str]:
        run = Path(shutil.copytree(c.assets.run, c.ws / "run"))
        (run / LOCK).unlink(missing_ok=True)
        if damage is not None:
            damage(run)
        return ["--config", TOY, f"output_dir={run}", *TINY,
                *(o.format(ws=c.ws, root=c.root) for o in overrides)]

    return argv


def empty_newest_checkpoint(run: Path) -> None:
    ckpt = run / "checkpoint-2"
    for child in list(ckpt.iterdir()):
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def truncate_weights(run: Path) -> None:
    weights = run / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def garbage_weights(run: Path) -> None:
    weights = run / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00" * weights.stat().st_size)


def sample_damaged_checkpoint(c: Ctx) -> list[str]:
    """eval/sample.py on a run's checkpoint whose state and U-Net weights are garbage of the right size."""
    run = Path(shutil.copytree(c.assets.run, c.ws / "run"))
    (run / LOCK).unlink(missing_ok=True)
    (run / "checkpoint-2" / "trainer_state.json").write_text("{not json")
    garbage_weights(run)
    return sample_argv(c, run / "checkpoint-2")


def image_folder(c: Ctx, name: str, images: dict[str, bytes], captions: bool = True) -> Path:
    folder = c.ws / name
    folder.mkdir()
    for file, data in images.items():
        (folder / file).write_bytes(data)
    lines = [json.dumps({"file_name": f, **({"text": f"caption of {f}"} if captions else {})}) for f in images]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def crafted_file(c: Ctx, edit: Callable[[dict], None], name: str = "crafted.safetensors") -> Path:
    """A copy of the sdkd single file whose metadata `edit` changed in place."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = c.assets.single_file
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    edit(meta)
    path = c.ws / "models" / name
    path.parent.mkdir(exist_ok=True)
    save_file(load_file(str(src)), str(path), metadata=meta)
    return path


def tokenizer_with(extra_name_of: Callable[[Ctx], str]) -> Callable[[Ctx], list[str]]:
    """eval/sample.py on a single file whose tokenizer metadata also names `extra_name_of(ctx)`, a path that
    must never be written."""

    def argv(c: Ctx) -> list[str]:
        name = extra_name_of(c)

        def edit(meta):
            files = json.loads(meta["sdkd.tokenizer"])
            files[name] = "written by a crafted model file"
            meta["sdkd.tokenizer"] = json.dumps(files)

        model = crafted_file(c, edit)
        # The reader rebuilds the tokenizer in a temporary folder ROOT/tmp/tmpXXXX: a name that escaped it would
        # land in ROOT (../../escape.txt) or at the absolute path.
        c.absent += [c.root / "escape.txt", c.root / "tmp" / "escape.txt", c.root.parent / "escape.txt",
                     c.root / "abs-escape.txt"]
        return sample_argv(c, model)

    return argv


def sample_argv(c: Ctx, model: Path | str, *extra: str, out: str = "{ws}/samples") -> list[str]:
    return ["--model", str(model), "--prompt", "a red fox", "--steps", "2",
            "--out", out.format(ws=c.ws), *extra]


def sample(*extra: str, model: str = "student", out: str = "{ws}/samples") -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        if "{ws}/kl_vae" in extra:
            shutil.copytree(c.assets.student / "vae", c.ws / "kl_vae")
        path = {"student": c.assets.student, "file": c.assets.single_file}.get(model) or model.format(ws=c.ws)
        return sample_argv(c, path, *(e.format(ws=c.ws, root=c.root) for e in extra), out=out)

    return argv


def with_samples_folder(c: Ctx) -> list[str]:
    out = c.ws / "my_samples"
    out.mkdir()
    (out / "image-000.png").write_bytes(png(1))
    (out / "samples.json").write_text('{"images": [{"file": "image-000.png", "prompt": "a red fox"}]}')
    return sample_argv(c, c.assets.student, out=str(out))


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    script: str
    setup: Callable[[Ctx], list[str]]
    culprit: str | tuple[str, ...]
    code: int = 2
    subprocess: bool = False  # run as `python SCRIPT` (or, script "launch.sh ...", through the launcher)
    absent: tuple[str, ...] = ()  # paths (formatted with ws, root) that must not exist afterwards
    env: dict[str, str] = field(default_factory=dict)  # environment variables the command runs with
    may_add: tuple[str, ...] = ()  # files (relative to the case root) the case may add: a run that started in
                                   # its new output folder (config.yaml, metrics.jsonl) before the data failed


def case(id_: str, script: str, setup, culprit, marks=(), **kw):
    return pytest.param(Case(script, setup, culprit, **kw), id=id_, marks=marks)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


KD = "train/kd.py"
SAMPLE = "eval/sample.py"
EXPORT = "train/export.py"

CONFIG_CASES = [
    case("config-file-missing", KD, lambda c: ["--config", str(c.ws / "missing.yaml"), f"output_dir={c.ws / 'out'}"],
         "config file not found: {ws}/missing.yaml"),
    case("config-yaml-syntax-error", KD, config_file("teacher: toy\ntrain:\n  max_steps: [1, 2\n  batch_size: 2\n",
                                                     "broken.yaml"),
         ("config file {ws}/broken.yaml: YAML syntax error at line ", ", column ")),
    case("config-top-level-list", KD, config_file("- teacher: toy\n- output_dir: x\n", "list.yaml"),
         ("config file {ws}/list.yaml", "got a list")),
    case("config-binary-file", KD, config_file(bytes(range(256)) * 4, "weights.yaml"),
         ("config file {ws}/weights.yaml", "cannot be read as text")),
    case("config-inherits-itself", KD, config_file("inherit: self.yaml\nteacher: toy\n", "self.yaml"),
         "config file {ws}/self.yaml: inherits from itself"),
    case("config-inherits-missing-file", KD, config_file("inherit: nowhere.yaml\nteacher: toy\n", "child.yaml"),
         "config file not found: {ws}/nowhere.yaml"),
    case("config-unknown-key", KD, kd("train.max_step=3"), "config key 'train.max_step'"),
    case("config-wrong-type", KD, kd("train.batch_size=two"), ("config key 'train.batch_size'", "two")),
    case("optim-lr-negative", KD, kd("optim.lr=-1"), "config key 'optim.lr'"),
    case("optim-betas-one", KD, kd("optim.betas=[0.9,1.0]"), "config key 'optim.betas'"),
    case("optim-scheduler-typo", KD, kd("optim.lr_scheduler=cosin"), ("config key 'optim.lr_scheduler'", "'cosin'")),
    case("optim-warmup-negative", KD, kd("optim.warmup_steps=-1"), "config key 'optim.warmup_steps'"),
    case("ema-decay-above-one", KD, kd("ema.decay=1.5"), "config key 'ema.decay'"),
    case("config-sample-steps-zero", KD, kd("sample.steps=0"), "config key 'sample.steps'"),
    case("loss-all-weights-zero", KD, kd("loss.lambda_task=0", "loss.lambda_out=0", "loss.lambda_feat=0"),
         ("config key 'loss.lambda_task'", "nothing to train")),
    case("data-resolution-not-multiple-of-8", KD, kd("data.resolution=100"), "config key 'data.resolution'"),
    case("train-batch-size-zero", KD, kd("train.batch_size=0"), "config key 'train.batch_size'"),
    case("override-without-equals", KD, kd("train.max_steps"), "override 'train.max_steps'"),
    case("override-broken-yaml", KD, kd("train.max_steps=[1"), ("override 'train.max_steps=[1'", "YAML syntax error")),
    case("student-preset-unknown", KD, kd("student.preset=huge"), ("config key 'student.preset'", "'huge'")),
    pytest.param(*case("mixed-precision-fp16-on-cpu", KD, kd("train.mixed_precision=fp16"),
                       "train.mixed_precision=fp16").values,
                 id="mixed-precision-fp16-on-cpu",
                 marks=pytest.mark.skipif("_cuda()", reason="fp16 is allowed where there is a CUDA GPU")),
    case("overwrite-and-resume", KD, kd("overwrite=true", "resume=latest"), "config key 'overwrite'"),
    case("finetune-without-model", "train/finetune.py",
         lambda c: [f"output_dir={c.ws / 'out'}", *TINY], "config key 'model'"),
    case("finetune-model-not-a-pipeline", "train/finetune.py",
         lambda c: ["--config", PORTRAIT_TOY, f"model={c.ws / 'precious'}", f"output_dir={c.ws / 'out'}", *TINY],
         ("model '{ws}/precious'", "model_index.json")),
    case("lora-rank-zero", "train/lora.py",
         lambda c: ["--config", LORA_TOY, f"model={c.assets.student}", f"output_dir={c.ws / 'out'}", *TINY,
                    "lora.rank=0"], "config key 'lora.rank'"),
    case("log-tracker-unknown", KD, kd("log.trackers=[mlflow]"), ("config key 'log.trackers[0]'", "'mlflow'")),
    case("data-interpolation-unknown", KD, kd("data.interpolation=cubic"),
         ("config key 'data.interpolation'", "'cubic'")),
    case("max-steps-and-num-epochs", KD, kd("train.max_steps=5", "train.num_epochs=2"),
         "config key 'train.num_epochs'"),
]


def lock_holder(c: Ctx) -> list[str]:
    """Another process runs in ws/busy: it has claimed the folder as a resumed run does, and holds it until its
    stdin closes (the test kills it at the end, or ends first)."""
    busy = fake_finished_run(c.ws / "busy")
    c.holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from accelerate import Accelerator; from sdkd.train.engine import run_folder; "
        "from sdkd.train.engine.config import RunConfig; "
        f"run_folder.claim(RunConfig(output_dir={str(busy)!r}, resume='latest'), Accelerator(cpu=True)); "
        "print('locked', flush=True); sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert c.holder.stdout.readline().strip() == "locked"
    return ["--config", TOY, f"output_dir={busy}", *TINY, "resume=latest"]


OUTPUT_CASES = [
    case("output-dir-is-a-file", KD, kd(out="{ws}/precious/thesis.tex"),
         "output_dir '{ws}/precious/thesis.tex': cannot be written"),
    case("output-dir-under-a-file", KD, kd(out="{ws}/precious/thesis.tex/run"),
         "output_dir '{ws}/precious/thesis.tex/run': cannot be written"),
    case("output-dir-holds-another-run", KD, kd(out="{ws}/old_run"),
         ("output_dir '{ws}/old_run' holds another run", "resume=latest", "overwrite=true")),
    case("output-dir-holds-no-run-overwrite", KD, kd("overwrite=true", out="{ws}/precious"),
         ("output_dir '{ws}/precious'", "holds no sdkd run")),
    # overwrite=true clears the old run only once the new one has loaded: a mistake found while loading loses nothing.
    case("overwrite-old-run-then-data-missing", KD,
         kd("overwrite=true", "data.source=imagefolder", "data.path={ws}/nowhere", out="{ws}/old_run"),
         "image folder not found: {ws}/nowhere"),
    case("overwrite-old-run-then-teacher-not-a-pipeline", KD,
         kd("overwrite=true", "teacher={ws}/precious", out="{ws}/old_run"),
         ("teacher '{ws}/precious'", "model_index.json")),
    case("output-dir-locked-by-another-run", KD, lock_holder, ("output_dir '{ws}/busy' is in use by another run",
                                                              "(pid {holder})")),
]

CHECKPOINT_CASES = [
    case("resume-path-not-a-checkpoint", KD, with_run("resume={ws}/precious"),
         ("resume '{ws}/precious': not a complete checkpoint", "trainer_state.json")),
    case("resume-newest-checkpoint-emptied", KD, with_run("resume=latest", damage=empty_newest_checkpoint),
         ("'{ws}/run/checkpoint-2' is incomplete", "latest_complete")),
    case("resume-weights-truncated", KD, with_run("resume=latest", damage=truncate_weights),
         ("'{ws}/run/checkpoint-2' is incomplete", "unet/diffusion_pytorch_model.safetensors")),
    case("resume-weights-garbage-same-size", KD, with_run("resume=latest", damage=garbage_weights),
         "resume '{ws}/run/checkpoint-2': cannot be loaded into this run"),
    case("resume-then-data-missing", KD,
         with_run("resume=latest", "data.source=imagefolder", "data.path={ws}/nowhere"),
         "image folder not found: {ws}/nowhere"),
    case("resume-into-another-layout", KD, with_run("resume=latest", "student.preset=bk_tiny"),
         "resume '{ws}/run/checkpoint-2': cannot be loaded into this run"),
]


def truncated_shard(c: Ctx) -> list[str]:
    folder = c.ws / "shards"
    shutil.copytree(c.assets.shards, folder)
    shard = folder / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    return ["--config", TOY, f"output_dir={c.ws / 'out'}", *TINY, "data.source=webdataset", f"data.path={folder}",
            "data.max_bad_in_a_row=20"]


def data_case(setup_folder: Callable[[Ctx], Path | str], *overrides: str,
              out: str = "{ws}/out") -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        path = setup_folder(c)
        return ["--config", TOY, f"output_dir={out.format(ws=c.ws)}", *TINY, *overrides, f"data.path={path}"]

    return argv


def cache_case(make: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        cache = c.ws / "cache"
        make(cache)
        return ["--config", TOY, f"output_dir={c.ws / 'out'}", *TINY, f"data.cache={cache}"]

    return argv


def garbage_cache(cache: Path) -> None:
    cache.mkdir()
    (cache / "latents-000000.safetensors").write_bytes(os.urandom(300))
    (cache / "notes.txt").write_text("not a cache")


def garbage_manifest(cache: Path) -> None:
    cache.mkdir()
    (cache / "manifest.json").write_bytes(b"\x89PNG garbage {{{")
    (cache / "latents-000000.safetensors").write_bytes(os.urandom(300))


# What a run has written by the time a bad sample stops it mid-run (a run whose data has no usable first batch
# writes nothing: its first write waits for that batch).
STARTED = ("ws/out/config.yaml", "ws/out/metrics.jsonl")

DATA_CASES = [
    case("imagefolder-missing", KD, data_case(lambda c: c.ws / "nowhere", "data.source=imagefolder"),
         "image folder not found: {ws}/nowhere"),
    case("imagefolder-without-metadata", KD,
         data_case(lambda c: write(c.ws / "pics" / "a.png", png()).parent, "data.source=imagefolder"),
         "{ws}/pics/metadata.jsonl: not found"),
    case("imagefolder-metadata-bad-json-line", KD,
         data_case(lambda c: write(c.ws / "pics" / "metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n{oops\n')
                   .parent, "data.source=imagefolder"),
         ("{ws}/pics/metadata.jsonl, line 2", "not valid JSON")),
    case("imagefolder-all-images-unreadable", KD,
         data_case(lambda c: image_folder(c, "broken", {f"{i}.png": b"not a png" for i in range(6)}),
                   "data.source=imagefolder"),
         ("data.source=imagefolder ({ws}/broken)", "no usable sample")),
    # overwrite=true on a run, and the data turns out unusable only once training has started.
    case("overwrite-old-run-then-no-usable-sample", KD,
         data_case(lambda c: image_folder(c, "broken", {f"{i}.png": b"not a png" for i in range(6)}),
                   "data.source=imagefolder", "overwrite=true", out="{ws}/old_run"),
         ("data.source=imagefolder ({ws}/broken)", "no usable sample")),
    case("webdataset-single-truncated-shard", KD, truncated_shard,
         ("data.source=webdataset ({ws}/shards)", "no usable sample", "shard-000000.tar")),
    case("webdataset-manifest-missing", KD,
         data_case(lambda c: Path(shutil.copytree(c.assets.shards, c.ws / "shards",
                                                  ignore=shutil.ignore_patterns("manifest.json"))),
                   "data.source=webdataset"),
         ("{ws}/shards/manifest.json: not found", "data.manifest")),
    case("hf-path-missing", KD, data_case(lambda c: c.ws / "no_such_dataset", "data.source=hf"),
         "data.path '{ws}/no_such_dataset'"),
    case("cache-missing", KD, cache_case(lambda cache: None), ("config key 'data.cache'", "{ws}/cache/manifest.json")),
    case("cache-garbage-folder", KD, cache_case(garbage_cache),
         ("config key 'data.cache'", "{ws}/cache/manifest.json")),
    case("cache-manifest-binary", KD, cache_case(garbage_manifest),
         ("config key 'data.cache'", "{ws}/cache/manifest.json")),
    case("cache-manifest-not-json", KD, cache_case(lambda cache: write(cache / "manifest.json", "{not json")),
         ("config key 'data.cache'", "{ws}/cache/manifest.json")),
    case("cache-manifest-without-shards", KD,
         cache_case(lambda cache: write(cache / "manifest.json", '{"format": "sdkd-latent-cache"}')),
         ("config key 'data.cache'", "{ws}/cache/manifest.json")),
    case("strict-with-one-bad-image", KD,
         data_case(lambda c: image_folder(c, "mixed", {**{f"{i}.png": png(i) for i in range(7)}, "7.png": b"junk"}),
                   "data.source=imagefolder", "data.strict=true"),
         ("bad sample (data.strict=true)", "{ws}/mixed/7.png"), may_add=STARTED),
    case("fewer-samples-than-one-batch", KD, kd("data.num_samples=1"), ("1 sample, fewer than one batch",)),
]


def teacher_without_index(c: Ctx) -> list[str]:
    folder = Path(shutil.copytree(c.assets.teacher_dir, c.ws / "teacher"))
    (folder / "model_index.json").unlink()
    return ["--config", TOY, f"output_dir={c.ws / 'out'}", *TINY, f"teacher={folder}"]


def pickle_teacher(c: Ctx) -> list[str]:
    folder = shutil.copytree(c.assets.pickle_teacher, c.ws / "old_teacher")
    return ["--config", TOY, f"output_dir={c.ws / 'out'}", *TINY, f"teacher={folder}"]


def model_file(make: Callable[[Ctx], Path]) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        return sample_argv(c, make(c))

    return argv


def without_sdkd_metadata(c: Ctx) -> Path:
    from safetensors.torch import load_file, save_file

    path = c.ws / "models" / "plain.safetensors"
    path.parent.mkdir()
    save_file(load_file(str(c.assets.single_file)), str(path), metadata={"format": "pt"})
    return path


def random_bytes_file(c: Ctx) -> Path:
    return write(c.ws / "models" / "random.safetensors", os.urandom(4096))


def truncated_model_file(c: Ctx) -> Path:
    data = c.assets.single_file.read_bytes()
    return write(c.ws / "models" / "truncated.safetensors", data[: len(data) // 2])


def damaged_metadata(meta: dict) -> None:
    meta["sdkd.unet_config"] = meta["sdkd.unet_config"][:-20]


MODEL_CASES = [
    case("teacher-folder-without-model-index", KD, teacher_without_index,
         ("teacher '{ws}/teacher'", "model_index.json")),
    case("teacher-pickle-weights-only", KD, pickle_teacher,
         ("teacher '{ws}/old_teacher/unet'", "pickle", "allow_pickle=true")),
    case("model-file-tokenizer-path-traversal", SAMPLE, tokenizer_with(lambda c: "../../escape.txt"),
         ("{ws}/models/crafted.safetensors", "unexpected tokenizer files", "../../escape.txt")),
    case("model-file-tokenizer-absolute-path", SAMPLE, tokenizer_with(lambda c: str(c.root / "abs-escape.txt")),
         ("{ws}/models/crafted.safetensors", "unexpected tokenizer files", "{root}/abs-escape.txt")),
    case("model-file-scheduler-not-a-scheduler", SAMPLE,
         model_file(lambda c: crafted_file(c, lambda m: m.update({"sdkd.scheduler_class": "StableDiffusionPipeline"}))),
         ("{ws}/models/crafted.safetensors", "'StableDiffusionPipeline', which is no diffusers scheduler")),
    case("model-file-no-sdkd-metadata", SAMPLE, model_file(without_sdkd_metadata),
         ("{ws}/models/plain.safetensors", "has no sdkd metadata")),
    case("model-file-random-bytes", SAMPLE, model_file(random_bytes_file),
         ("{ws}/models/random.safetensors", "not a readable .safetensors file")),
    case("model-file-truncated", SAMPLE, model_file(truncated_model_file), "{ws}/models/truncated.safetensors"),
    case("model-file-damaged-metadata-json", SAMPLE, model_file(lambda c: crafted_file(c, damaged_metadata)),
         ("{ws}/models/crafted.safetensors", "damaged sdkd metadata")),
]


def lora_of_another_layout(c: Ctx) -> list[str]:
    lora = shutil.copy(c.assets.teacher_lora, c.ws / "teacher_lora.safetensors")
    return sample_argv(c, c.assets.student, "--lora", str(lora))


def lora_as_model(c: Ctx) -> list[str]:
    lora = shutil.copy(c.assets.teacher_lora, c.ws / "teacher_lora.safetensors")
    return sample_argv(c, lora)


def out_is_a_file(c: Ctx) -> list[str]:
    return sample_argv(c, c.assets.student, out=str(c.ws / "precious" / "thesis.tex"))


SAMPLE_CASES = [
    case("sample-height-negative", SAMPLE, sample("--height", "-8"), "--height"),
    case("sample-checkpoint-damaged", SAMPLE, sample_damaged_checkpoint,
         ("U-Net '{ws}/run/checkpoint-2/unet' could not be loaded",)),
    case("sample-height-not-a-multiple", SAMPLE, sample("--height", "101"), ("--height", "101")),
    case("sample-height-100", SAMPLE, sample("--height", "100"), ("--height", "100")),
    case("sample-width-zero", SAMPLE, sample("--width", "0"), ("--width", "got 0")),
    case("sample-num-images-negative", SAMPLE, sample("--num-images", "-1"), ("--num-images", "-1")),
    case("sample-out-is-a-file", SAMPLE, out_is_a_file, "--out '{ws}/precious/thesis.tex' is a file"),
    case("sample-out-holds-samples", SAMPLE, with_samples_folder, ("--out '{ws}/my_samples' already holds samples",
                                                                    "--overwrite")),
    case("sample-cli-steps-zero", SAMPLE, sample("--steps", "0"), ("--steps", "got 0")),
    case("sample-model-missing", SAMPLE, sample(model="{ws}/no_model"), "'{ws}/no_model' not found"),
    case("sample-batch-size-zero", SAMPLE, sample("--batch-size", "0"), ("--batch-size", "got 0")),
    case("sample-guidance-negative", SAMPLE, sample("--guidance", "-1"), ("--guidance", "-1")),
    case("sample-model-is-a-lora", SAMPLE, lora_as_model,
         ("'{ws}/teacher_lora.safetensors' holds a LoRA adapter, not a model", "--lora")),
    case("sample-tiny-vae-is-a-kl-vae", SAMPLE, sample("--tiny-vae", "{ws}/kl_vae"),
         ("--tiny-vae '{ws}/kl_vae'", "AutoencoderKL", "not an AutoencoderTiny")),
    case("sample-lora-of-another-layout", SAMPLE, lora_of_another_layout,
         ("LoRA '{ws}/teacher_lora.safetensors' does not fit this model", "'teacher'")),
]


def export_to_directory(c: Ctx) -> list[str]:
    return [str(c.assets.student), "--format", "single-file", "--out", str(c.ws / "precious")]


def export_sdcpp_bk_small(c: Ctx) -> list[str]:
    return [str(c.assets.student), "--format", "single-file", "--target", "sdcpp",
            "--out", str(c.ws / "exports" / "student-sdcpp.safetensors")]


def make_shards_missing_input(c: Ctx) -> list[str]:
    return [str(c.ws / "no_images"), str(c.ws / "shards_out")]


def cache_latents_to_a_file(c: Ctx) -> list[str]:
    return ["--config", TOY, *TINY, f"data.cache={c.ws / 'precious' / 'thesis.tex'}"]


TOOL_CASES = [
    case("export-single-file-out-is-a-directory", EXPORT, export_to_directory,
         ("--out '{ws}/precious'", "writes one file")),
    case("export-sdcpp-of-bk-small", EXPORT, export_sdcpp_bk_small, ("stable-diffusion.cpp cannot run", "bk_small"),
         absent=("{ws}/exports/student-sdcpp.safetensors", "{ws}/exports/.student-sdcpp.safetensors.tmp")),
    case("export-vae-not-a-vae", EXPORT, lambda c: [str(c.assets.student), "--format", "diffusers", "--vae",
                                                    str(c.ws / "precious"), "--out", str(c.ws / "export")],
         "no VAE at '{ws}/precious'", absent=("{ws}/export",)),
    case("export-nonexistent-run", EXPORT, lambda c: [str(c.ws / "runs" / "gone"), "--format", "diffusers", "--out",
                                                      str(c.ws / "export")],
         "'{ws}/runs/gone' not found", absent=("{ws}/export",)),
    case("show-student-preset-unknown", "train/show_student.py", lambda c: ["--teacher", "toy", "--preset", "huge"],
         "'huge'"),
    case("convert-lora-not-found", "train/convert_lora.py",
         lambda c: ["to-sdcpp", str(c.ws / "nope.safetensors"), "--out", str(c.ws / "lora_sdcpp.safetensors")],
         "LoRA '{ws}/nope.safetensors' not found", absent=("{ws}/lora_sdcpp.safetensors",)),
    case("make-shards-missing-input", "data/make_shards.py", make_shards_missing_input, "{ws}/no_images"),
    case("cache-latents-output-is-a-file", "train/cache_latents.py", cache_latents_to_a_file,
         "{ws}/precious/thesis.tex"),
    case("evaluate-unknown-key", "eval/evaluate.py",
         lambda c: [str(c.assets.student), "--teacher", str(c.assets.teacher_dir), "--out", str(c.ws / "ev"),
                    "bogus=1"], "config key 'bogus'", absent=("{ws}/ev",)),
    case("evaluate-out-holds-other-files", "eval/evaluate.py",
         lambda c: [str(c.assets.student), "--teacher", str(c.assets.teacher_dir), "--config",
                    str(ROOT / "configs" / "eval_toy.yaml"), "--out", str(c.ws / "precious"), "--overwrite"],
         "{ws}/precious"),
    case("tiny-decoder-gan-loss-unknown", "train/tiny_decoder.py",
         lambda c: ["--config", str(ROOT / "configs" / "toy_decoder.yaml"), f"output_dir={c.ws / 'td'}",
                    "gan.loss=wasserstein"], ("gan.loss", "hinge or non_saturating", "'wasserstein'"),
         absent=("{ws}/td",)),
    case("tiny-decoder-init-missing", "train/tiny_decoder.py",
         lambda c: ["--config", str(ROOT / "configs" / "toy_decoder.yaml"), f"output_dir={c.ws / 'td'}",
                    f"teacher={c.assets.teacher_dir}", *TINY, "decoder.eval_latents=2",
                    f"decoder.init={c.ws / 'taesd.safetensors'}"],
         ("decoder.init", "{ws}/taesd.safetensors")),
    case("one-step-online-kind-unknown", "train/one_step.py",
         lambda c: ["--config", str(ROOT / "configs" / "one_step_toy.yaml"), f"output_dir={c.ws / 'os'}",
                    "online.kind=full"], ("online.kind", "copy or lora", "'full'"), absent=("{ws}/os",)),
    case("one-step-decoder-missing", "train/one_step.py",
         lambda c: ["--config", str(ROOT / "configs" / "one_step_toy.yaml"), f"output_dir={c.ws / 'os'}",
                    f"teacher={c.assets.teacher_dir}", *TINY, f"decoder={c.ws / 'taesd.safetensors'}"],
         ("config key 'decoder'", "{ws}/taesd.safetensors")),
    case("toy-ablation-zero-steps", "eval/toy_ablation.py", lambda c: ["--out", str(c.ws / "abl"), "--steps", "0"],
         "--steps", absent=("{ws}/abl",)),
    case("launcher-trainer-unknown-key", "train/launch.py",  # what launch.sh runs, with its options given
         lambda c: ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                    "no", str(ROOT / KD), "--config", TOY, f"output_dir={c.ws / 'out'}", "train.bogus_key=1"],
         "config key 'train.bogus_key'", absent=("{ws}/out",)),
]


def launch(c: Ctx, gpus: list[str], *args: str) -> list[str]:
    return ["./launch.sh", *gpus, "--port", str(free_port()), "train/kd.py", "--config", TOY,
            f"output_dir={c.ws / 'out'}", *TINY, *args]


PROCESS_CASES = [
    case("launch-two-ranks-imagefolder-missing", "launch.sh",
         lambda c: launch(c, ["--gpus", "2"], "data.source=imagefolder", f"data.path={c.ws / 'MISSING'}"),
         "image folder not found: {ws}/MISSING", subprocess=True, marks=pytest.mark.slow),
    case("launch-one-process-unknown-key", "launch.sh", lambda c: launch(c, ["--gpus", "1"], "train.bogus_key=1"),
         "config key 'train.bogus_key'", subprocess=True),
    case("python-kd-yaml-syntax-error", KD, config_file("teacher: toy\ndata: {source: synthetic\n", "broken.yaml"),
         ("config file {ws}/broken.yaml: YAML syntax error at line ", ", column "), subprocess=True),
]

# issue 22: refused starts write nothing (h2)
HUB_ID = "sdkd-tests/no-such-model"


def new_absent(*paths: Path) -> list[Path]:
    """Nothing to check at a path that exists before the case (a root folder's `.lock` left by something else)."""
    return [p for p in paths if not p.exists()]


def home_folder(c: Ctx) -> Path:
    """HOME is ROOT/tmp/home for the case, holding a file of the user's; its .lock must not appear."""
    home = c.root / "tmp" / "home"
    write(home / "notes.txt", "mine")
    c.monkeypatch.setenv("HOME", str(home))
    c.absent += [home / LOCK]
    return home


def offline_hub(c: Ctx) -> None:
    """The hub switched off (HF_HUB_OFFLINE) and an empty hub cache: a hub id is neither cached nor fetched."""
    from huggingface_hub import constants

    c.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    c.monkeypatch.setattr(constants, "HF_HUB_CACHE", str(c.root / "tmp" / "hub"))


def refused_at(out: Callable[[Ctx], str], *overrides: str) -> Callable[[Ctx], list[str]]:
    """train/kd.py into output_dir `out(ctx)`; its .lock must not appear."""

    def argv(c: Ctx) -> list[str]:
        folder = out(c)
        c.absent += new_absent(Path(folder or ".").absolute() / LOCK)
        return ["--config", TOY, f"output_dir={folder or repr('')}", *TINY, *overrides]

    return argv


# issue 22: links, overwrites, caches (h3)


def link(path: Path, target: Path) -> None:
    """`path` made a symbolic link to `target` (what a run folder received as a tar may hold)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(target, target_is_directory=target.is_dir())


def alias(path: Path, target: Path) -> Path:
    """A link the user made on purpose: `path` -> `target`; returns `path`."""
    path.symlink_to(target)
    return path


def link_out(name: str, target: str = "precious/thesis.tex") -> Callable[[Path], None]:
    """A damage for `with_run`: RUN/NAME becomes a link to WS/TARGET (outside the run)."""
    return lambda run: link(run / name, run.parent / target)


def garbage_state(name: str) -> Callable[[Path], None]:
    """A damage for `with_run`: the checkpoint's accelerate state file NAME, garbage of its own size."""
    def damage(run: Path) -> None:
        f = run / "checkpoint-2" / name
        f.write_bytes(bytes(range(256)) * (f.stat().st_size // 256) + b"\x80" * (f.stat().st_size % 256))

    return damage


def holding_link(folder: str, name: str, target: str = "precious/thesis.tex", files: dict | None = None):
    """WS/FOLDER made with `files` and NAME a link to WS/TARGET; returns the folder."""
    def make(c: Ctx) -> Path:
        out = c.ws / folder
        out.mkdir(parents=True, exist_ok=True)
        for file, data in (files or {}).items():
            write(out / file, data)
        link(out / name, c.ws / target)
        return out

    return make


def convert_lora(out: Callable[[Ctx], Path | str], *extra: str, src: Callable[[Ctx], Path] | None = None):
    """train/convert_lora.py to-sdcpp on a copy of the toy teacher's LoRA at ws/lora/ (or `src`)."""
    def argv(c: Ctx) -> list[str]:
        lora = c.ws / "lora" / "pytorch_lora_weights.safetensors"
        lora.parent.mkdir()
        shutil.copy(c.assets.teacher_lora, lora)
        return ["to-sdcpp", str(src(c) if src else lora), "--out", str(out(c)), *extra]

    return argv


# issue 22: bounds, shards, last tracebacks (h4)
# Every text and number has a bound (sdkd/cli/limits.py), said in one line naming the flag or key, before any
# model loads; the last tracebacks and messages that named the wrong thing.

MEGA = "a red fox " * 100_000  # a megabyte of prompt
SEED_OVER = str(2**64)


def evaluate(*overrides: str, prompt_file: str | None = None) -> Callable[[Ctx], list[str]]:
    """eval/evaluate.py on the toy student against the toy teacher, OUT = ws/ev (new); `prompt_file`: the text
    of ws/prompts.txt, given as the prompt file."""

    def argv(c: Ctx) -> list[str]:
        extra = [f"prompt_file={write(c.ws / 'prompts.txt', prompt_file)}"] if prompt_file is not None else []
        return [str(c.assets.student), "--teacher", str(c.assets.teacher_dir), "--out", str(c.ws / "ev"), *extra,
                *overrides]

    return argv


def hub_case(argv: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        offline_hub(c)
        return argv(c)

    return setup


REFUSED_START_CASES = [
    case("output-dir-empty-string", KD, refused_at(lambda c: ""), "output_dir is empty"),
    case("output-dir-root", KD, refused_at(lambda c: "/"), "output_dir '/' is the root folder"),
    case("output-dir-root-resume", KD, refused_at(lambda c: "/", "resume=latest"), "output_dir '/' is the root folder"),
    case("output-dir-home", KD, refused_at(lambda c: str(home_folder(c))), "is your home folder"),
    case("output-dir-home-overwrite", KD, refused_at(lambda c: str(home_folder(c)), "overwrite=true"),
         "is your home folder"),
    case("output-dir-working-directory-of-user-files", KD, refused_at(lambda c: "."),
         ("output_dir '.'", "holds no sdkd run")),
    case("output-dir-user-files", KD, refused_at(lambda c: str(c.ws / "precious")),
         ("output_dir '{ws}/precious'", "holds no sdkd run")),
    case("output-dir-user-files-resume", KD, refused_at(lambda c: str(c.ws / "precious"), "resume=latest"),
         ("output_dir '{ws}/precious'", "holds no sdkd run")),
    case("output-dir-another-run-no-lock-left", KD, refused_at(lambda c: str(c.ws / "old_run")),
         ("output_dir '{ws}/old_run' holds another run",)),
    case("output-dir-under-a-file-no-folder-made", KD,
         refused_at(lambda c: str(c.ws / "precious" / "thesis.tex" / "r")),
         "output_dir '{ws}/precious/thesis.tex/r': cannot be written"),
    case("teacher-missing-no-output-dir", KD, kd("teacher={ws}/no_teacher"), "teacher '{ws}/no_teacher' not found",
         absent=("{ws}/out",)),
    case("teacher-hub-offline-no-output-dir", KD, hub_case(kd(f"teacher={HUB_ID}")),
         (f"teacher '{HUB_ID}'", "HF_HUB_OFFLINE is set", "local diffusers folder"), absent=("{ws}/out",)),
    case("finetune-model-hub-offline-no-output-dir", "train/finetune.py",
         hub_case(lambda c: ["--config", PORTRAIT_TOY, f"model={HUB_ID}", f"output_dir={c.ws / 'out'}", *TINY]),
         (f"model '{HUB_ID}'", "HF_HUB_OFFLINE is set"), absent=("{ws}/out",)),
    case("imagefolder-missing-no-output-dir", KD, kd("data.source=imagefolder", "data.path={ws}/nowhere"),
         "image folder not found: {ws}/nowhere", absent=("{ws}/out",)),
    case("cache-missing-no-output-dir", KD, kd("data.cache={ws}/no_cache"),
         ("config key 'data.cache'", "{ws}/no_cache/manifest.json"), absent=("{ws}/out",)),
    case("sample-hub-offline-no-out", SAMPLE, hub_case(lambda c: sample_argv(c, HUB_ID)),
         (f"model '{HUB_ID}'", "HF_HUB_OFFLINE is set"), absent=("{ws}/samples",)),
    case("sample-model-missing-no-out", SAMPLE, lambda c: sample_argv(c, c.ws / "gone"), "'{ws}/gone' not found",
         absent=("{ws}/samples",)),
    case("sample-lora-missing-no-out", SAMPLE, sample("--lora", "{ws}/none.safetensors"), "{ws}/none.safetensors",
         absent=("{ws}/samples",)),
    case("sample-threads-zero", SAMPLE, sample("--threads", "0"), "--threads must be at least 1, got 0",
         absent=("{ws}/samples",)),
    case("sample-out-under-a-file", SAMPLE, sample(out="{ws}/precious/thesis.tex/s"),
         "--out '{ws}/precious/thesis.tex/s': cannot be written"),
    case("export-hub-offline-no-out", EXPORT,
         hub_case(lambda c: [HUB_ID, "--format", "diffusers", "--out", str(c.ws / "export")]),
         (f"model '{HUB_ID}'", "HF_HUB_OFFLINE is set"), absent=("{ws}/export",)),
    case("evaluate-teacher-hub-offline-no-out", "eval/evaluate.py",
         hub_case(lambda c: [str(c.assets.student), "--teacher", HUB_ID, "--out", str(c.ws / "ev")]),
         (f"--teacher '{HUB_ID}'", "HF_HUB_OFFLINE is set"), absent=("{ws}/ev",)),
    case("evaluate-threads-negative", "eval/evaluate.py",
         lambda c: [str(c.assets.student), "--teacher", "none", "--out", str(c.ws / "ev"), "--threads", "-2"],
         "--threads must be at least 1, got -2", absent=("{ws}/ev",)),
    case("show-student-hub-offline", "train/show_student.py",
         hub_case(lambda c: ["--teacher", HUB_ID, "--preset", "bk_small"]),
         (f"--teacher '{HUB_ID}'", "HF_HUB_OFFLINE")),
]



def sample_with_link(c: Ctx) -> list[str]:
    out = holding_link("my_samples", "image-000.png", "precious/holiday.png",
                       {"samples.json": '{"images": []}'})(c)
    return sample_argv(c, c.assets.student, "--overwrite", out=str(out))


def evaluate_with_link(c: Ctx) -> list[str]:
    out = holding_link("ev", "report.json", files={"evaluate.yaml": "seed: 0\n"})(c)
    return [str(c.assets.student), "--teacher", "none", "--config", str(ROOT / "configs" / "eval_toy.yaml"),
            "--out", str(out), "--overwrite"]


def make_shards_argv(out: Callable[[Ctx], Path], src: Callable[[Ctx], Path] | None = None):
    def argv(c: Ctx) -> list[str]:
        pics = src(c) if src else image_folder(c, "pics", {"a.png": png(1), "b.png": png(2)})
        return [str(pics), str(out(c))]

    return argv


def toy_teacher_at(c: Ctx, name: str = "tt") -> Path:
    """WS/NAME holding what make_toy_teacher leaves (as far as its checks look: provenance.json, vae/)."""
    write(c.ws / name / "provenance.json", '{"family": "sd"}\n')
    write(c.ws / name / "vae" / "config.json", '{"_class_name": "AutoencoderKL"}\n')
    return c.ws / name


def copy_student(c: Ctx) -> Path:
    return Path(shutil.copytree(c.assets.student, c.ws / "student"))


def cached_with_changed_teacher(part: str) -> Callable[[Ctx], list[str]]:
    """train/kd.py from the toy cache, the teacher being a copy of the toy teacher whose PART weights changed."""
    def argv(c: Ctx) -> list[str]:
        import torch
        from safetensors.torch import load_file, save_file

        from sdkd.train.models.toy import toy_teacher_folder

        teacher = Path(shutil.copytree(toy_teacher_folder("toy"), c.ws / "teacher"))
        weights = next((teacher / part).glob("*.safetensors"))
        tensors = load_file(str(weights))
        first = sorted(tensors)[0]
        tensors[first] = tensors[first] + torch.full_like(tensors[first], 0.01)
        save_file(tensors, str(weights), metadata={"format": "pt"})
        return ["--config", TOY, f"output_dir={c.ws / 'out'}", *TINY, f"teacher={teacher}",
                f"data.cache={c.assets.cache}"]

    return argv


def damaged_cache(damage: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        cache = Path(shutil.copytree(c.assets.cache, c.ws / "cache"))
        damage(cache / "latents-000000.safetensors")
        return ["--config", TOY, f"output_dir={c.ws / 'out'}", *TINY, f"data.cache={cache}"]

    return argv


def bk_small_lora_on_teacher(c: Ctx) -> list[str]:
    lora = shutil.copy(c.assets.student_lora, c.ws / "student_lora.safetensors")
    return sample_argv(c, c.assets.teacher_dir, "--lora", str(lora))


ONE_STEP = ["--config", str(ROOT / "configs" / "one_step_toy.yaml"), *TINY]
LINK = "holds a symbolic link leading out of it"
CONVERT = "train/convert_lora.py"
SHARDS = "data/make_shards.py"
TOY_TEACHER = "train/make_toy_teacher.py"

H3_CASES = [
    # Links in a run folder: refused before anything is written, whatever the run was asked to do.
    case("resume-config-yaml-links-out", KD, with_run("resume=latest", damage=link_out("config.yaml")),
         ("output_dir '{ws}/run' " + LINK, "'{ws}/run/config.yaml' -> '{ws}/precious/thesis.tex'")),
    case("resume-metrics-links-out", KD, with_run("resume=latest", damage=link_out("metrics.jsonl")),
         ("output_dir '{ws}/run' " + LINK, "'{ws}/run/metrics.jsonl'")),
    case("resume-checkpoint-folder-links-out", KD,
         with_run("resume=latest", damage=lambda run: (shutil.copytree(run / "checkpoint-2", run.parent / "elsewhere"),
                                                      link(run / "checkpoint-2", run.parent / "elsewhere"))),
         ("output_dir '{ws}/run' " + LINK, "'{ws}/run/checkpoint-2' -> '{ws}/elsewhere'")),
    case("resume-samples-folder-links-out", KD, with_run("resume=latest", damage=link_out("samples", "precious")),
         ("output_dir '{ws}/run' " + LINK, "'{ws}/run/samples' -> '{ws}/precious'")),
    case("resume-file-in-checkpoint-links-out", KD,
         with_run("resume=latest", damage=link_out("checkpoint-2/trainer_state.json")),
         ("output_dir '{ws}/run' " + LINK, "'{ws}/run/checkpoint-2/trainer_state.json'")),
    case("resume-dangling-link", KD,
         with_run("resume=latest", damage=lambda run: (run / "notes.txt").symlink_to(run.parent / "gone" / "x")),
         ("output_dir '{ws}/run' " + LINK, "'{ws}/run/notes.txt'"), absent=("{ws}/gone",)),
    case("resume-lock-file-links-out", KD, with_run("resume=latest", damage=link_out(LOCK)),
         ("output_dir '{ws}/run' " + LINK, "'{ws}/run/.lock' -> '{ws}/precious/thesis.tex'")),
    case("overwrite-run-holding-a-link-out", KD, with_run("overwrite=true", damage=link_out("metrics.jsonl")),
         ("output_dir '{ws}/run' " + LINK, "'{ws}/run/metrics.jsonl'")),
    case("new-run-into-run-holding-a-link-out", KD, with_run(damage=link_out("config.yaml")),
         ("output_dir '{ws}/run' " + LINK, "'{ws}/run/config.yaml'")),
    # Links in the folders the tools write into.
    case("sample-out-image-links-out", SAMPLE, sample_with_link,
         ("--out '{ws}/my_samples' " + LINK, "'{ws}/my_samples/image-000.png' -> '{ws}/precious/holiday.png'")),
    case("evaluate-out-links-out", "eval/evaluate.py", evaluate_with_link,
         ("--out '{ws}/ev' " + LINK, "'{ws}/ev/report.json'")),
    case("cache-latents-out-links-out", "train/cache_latents.py",
         lambda c: ["--config", TOY, *TINY, f"data.cache={holding_link('cache', 'manifest.json')(c)}", "--overwrite"],
         ("data.cache '{ws}/cache' " + LINK, "'{ws}/cache/manifest.json'")),
    case("make-shards-out-links-out", SHARDS, make_shards_argv(holding_link("shards_out", "notes.txt")),
         ("out '{ws}/shards_out' " + LINK, "'{ws}/shards_out/notes.txt'")),
    case("export-diffusers-out-links-out", EXPORT,
         lambda c: [str(c.assets.student), "--format", "diffusers", "--out",
                    str(holding_link("export", "model_index.json")(c)), "--overwrite"],
         ("--out '{ws}/export' " + LINK, "'{ws}/export/model_index.json'")),
    case("toy-ablation-out-links-out", "eval/toy_ablation.py",
         lambda c: ["--out", str(holding_link("abl", "results.json")(c)), "--steps", "1", "--overwrite"],
         ("--out '{ws}/abl' " + LINK, "'{ws}/abl/results.json'")),
    case("one-step-pairs-cache-links-out", "train/one_step.py",
         lambda c: [*ONE_STEP, f"output_dir={c.ws / 'os'}", f"teacher={c.assets.teacher_dir}",
                    f"pairs.cache={holding_link('pairs', 'train.json')(c)}"],
         ("ODE-pair folder '{ws}/pairs' " + LINK, "'{ws}/pairs/train.json'"), may_add=STARTED),
    # Existing files replaced only when asked, and never the command's inputs.
    case("convert-lora-out-is-its-input", CONVERT,
         convert_lora(lambda c: c.ws / "lora" / "pytorch_lora_weights.safetensors", "--overwrite"),
         "--out '{ws}/lora/pytorch_lora_weights.safetensors' is the command's input"),
    case("convert-lora-out-is-the-file-of-its-input-folder", CONVERT,
         convert_lora(lambda c: c.ws / "lora" / "pytorch_lora_weights.safetensors", "--overwrite",
                      src=lambda c: c.ws / "lora"),
         "--out '{ws}/lora/pytorch_lora_weights.safetensors' is the command's input"),
    case("convert-lora-out-is-its-input-through-a-link", CONVERT,
         convert_lora(lambda c: alias(c.ws / "alias.safetensors", c.ws / "lora" / "pytorch_lora_weights.safetensors"),
                      "--overwrite"),
         "--out '{ws}/alias.safetensors' is the command's input"),
    case("convert-lora-out-exists", CONVERT, convert_lora(lambda c: c.ws / "precious" / "thesis.tex"),
         ("--out '{ws}/precious/thesis.tex' exists", "--overwrite")),
    case("convert-lora-out-is-a-folder", CONVERT, convert_lora(lambda c: c.ws / "precious", "--overwrite"),
         "--out '{ws}/precious' is a folder"),
    case("make-shards-out-is-a-file", SHARDS, make_shards_argv(lambda c: c.ws / "precious" / "thesis.tex"),
         "{ws}/precious/thesis.tex: is a file"),
    case("make-shards-out-is-its-input", SHARDS, make_shards_argv(lambda c: c.ws / "pics"),
         "{ws}/pics: is the input '{ws}/pics'"),
    case("make-shards-out-holds-a-manifest", SHARDS,
         make_shards_argv(lambda c: write(c.ws / "shards_out" / "manifest.json", "{}").parent),
         "{ws}/shards_out: already holds shards"),
    case("make-toy-teacher-out-is-a-file", TOY_TEACHER,
         lambda c: ["--out", str(c.ws / "precious" / "thesis.tex"), "--work", str(c.ws / "work")],
         "--out '{ws}/precious/thesis.tex' is a file", absent=("{ws}/work",)),
    case("make-toy-teacher-out-holds-a-teacher", TOY_TEACHER,
         lambda c: ["--out", str(toy_teacher_at(c)), "--work", str(c.ws / "work")],
         ("--out '{ws}/tt' holds a toy teacher", "--overwrite"), absent=("{ws}/work",)),
    case("make-toy-teacher-vae-inside-out", TOY_TEACHER,
         lambda c: ["--family", "sdxl", "--out", str(toy_teacher_at(c)), "--vae", str(c.ws / "tt" / "vae"),
                    "--work", str(c.ws / "work"), "--overwrite"],
         "--vae '{ws}/tt/vae' is inside --out '{ws}/tt'", absent=("{ws}/work",)),
    case("export-single-file-out-is-its-input", EXPORT,
         lambda c: [str(shutil.copy(c.assets.single_file, c.ws / "student.safetensors")), "--format", "single-file",
                    "--out", str(c.ws / "student.safetensors"), "--overwrite"],
         "--out '{ws}/student.safetensors' is the model to export"),
    case("export-diffusers-out-is-its-input", EXPORT,
         lambda c: [str(copy_student(c)), "--format", "diffusers", "--out", str(c.ws / "student"), "--overwrite"],
         "--out '{ws}/student' is the model to export"),
    case("export-single-file-out-exists", EXPORT,
         lambda c: [str(c.assets.student), "--format", "single-file", "--out",
                    str(write(c.ws / "models" / "mine.safetensors", b"my model"))],
         ("--out '{ws}/models/mine.safetensors' already exists", "--overwrite")),
    case("sample-out-holds-samples-json-only", SAMPLE,
         lambda c: sample_argv(c, c.assets.student,
                               out=str(write(c.ws / "shots" / "samples.json", '{"images": []}').parent)),
         ("--out '{ws}/shots' already holds samples", "--overwrite")),
    case("cache-latents-cache-is-the-data-folder", "train/cache_latents.py",
         lambda c: ["--config", TOY, *TINY, "data.source=imagefolder",
                    f"data.path={image_folder(c, 'pics', {'a.png': png(1)})}", f"data.cache={c.ws / 'pics'}",
                    "--overwrite"],
         "config key 'data.cache': '{ws}/pics' is the data set's folder"),
    case("toy-ablation-out-not-empty", "eval/toy_ablation.py",
         lambda c: ["--out", str(c.ws / "precious"), "--steps", "1"],
         ("--out '{ws}/precious' is not empty", "--overwrite")),
    # Caches keyed by the weights they were made with, not the teacher's path.
    case("cache-made-with-other-vae-weights", KD, cached_with_changed_teacher("vae"),
         ("latent cache", "was made with other weights of the teacher's vae", "'toy'", "--overwrite")),
    case("cache-made-with-other-text-encoder-weights", KD, cached_with_changed_teacher("text_encoder"),
         ("latent cache", "was made with other weights of the teacher's text_encoder")),
    # Damaged checkpoint state and cache shards: one line naming the file (a damaged state is found only once the
    # run has built its models: those cases go to the full suite).
    case("resume-optimizer-state-garbage", KD, with_run("resume=latest", damage=garbage_state("optimizer.bin")),
         ("resume '{ws}/run/checkpoint-2'", "optimizer.bin is damaged"), marks=pytest.mark.slow),
    case("resume-random-state-garbage", KD, with_run("resume=latest", damage=garbage_state("random_states_0.pkl")),
         ("resume '{ws}/run/checkpoint-2'", "random_states_0.pkl is damaged"), marks=pytest.mark.slow),
    case("resume-scheduler-state-garbage", KD, with_run("resume=latest", damage=garbage_state("scheduler.bin")),
         ("resume '{ws}/run/checkpoint-2'", "scheduler.bin is damaged"), marks=pytest.mark.slow),
    case("cache-shard-truncated", KD,
         damaged_cache(lambda shard: shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])),
         "latent cache shard {ws}/cache/latents-000000.safetensors is damaged"),
    case("cache-shard-missing", KD, damaged_cache(lambda shard: shard.unlink()),
         "latent cache shard {ws}/cache/latents-000000.safetensors is damaged or missing"),
    # A LoRA loads only onto the layout it was trained on.
    case("sample-bk-small-lora-on-the-teacher", SAMPLE, bk_small_lora_on_teacher,
         ("LoRA '{ws}/student_lora.safetensors' does not fit this model", "'bk_small'", "'teacher'")),
]


def yaml_section_as_number(c: Ctx) -> list[str]:
    return config_file("teacher: toy\ntrain: 5\n", "recipe.yaml", *TINY)(c)


def images_without_captions(c: Ctx) -> list[str]:
    for i in range(3):
        write(c.ws / "pics" / f"{i}.png", png(i))
    return [str(c.ws / "pics"), str(c.ws / "shards_out")]


def full_model_as_lora(c: Ctx) -> list[str]:
    model = shutil.copy(c.assets.single_file, c.ws / "model.safetensors")
    return ["to-sdcpp", str(model), "--out", str(c.ws / "lora_sdcpp.safetensors")]


def ablation_run_folder_taken(c: Ctx) -> list[str]:
    """toy_ablation's first run folder already holds the user's files (--overwrite: an earlier ablation may be
    replaced): its kd.py run refuses it (overwrite=true replaces only an sdkd run), and that line must come
    through."""
    write(c.ws / "abl" / "runs" / "bk_small-task_only-seed0" / "notes.txt", "mine")
    return ["--out", str(c.ws / "abl"), "--steps", "2", "--seeds", "0", "--presets", "bk_small", "--overwrite"]


BENCH_DATA, BENCH_KD = "eval/bench_data.py", "eval/bench_kd_step.py"
TOO_LONG = ("at most 10,000 characters", "1,000,000 characters")

BOUNDS_CASES = [
    # eval/sample.py: checked before the model loads
    case("sample-prompt-a-megabyte", SAMPLE, sample("--prompt", MEGA), ("--prompt", *TOO_LONG)),
    case("sample-negative-prompt-a-megabyte", SAMPLE, sample("--negative-prompt", MEGA),
         ("--negative-prompt", *TOO_LONG)),
    case("sample-seed-negative", SAMPLE, sample("--seed", "-1"), ("--seed", "got -1")),
    case("sample-seed-over-64-bits", SAMPLE, sample("--seed", SEED_OVER), ("--seed", f"got {SEED_OVER}")),
    case("sample-seed-plus-images-over-63-bits", SAMPLE, sample("--seed", str(2**63 - 1), "--num-images", "2"),
         ("--seed", "seed + 1 for 2 images")),
    case("sample-guidance-nan", SAMPLE, sample("--guidance", "nan"), ("--guidance", "finite", "got nan")),
    case("sample-guidance-infinite", SAMPLE, sample("--guidance", "inf"), ("--guidance", "got inf")),
    case("sample-guidance-a-million", SAMPLE, sample("--guidance", "1e6"), ("--guidance", "from 0 to 100")),
    case("sample-steps-a-million", SAMPLE, sample("--steps", "1000000"), ("--steps", "got 1000000")),
    case("sample-height-100k", SAMPLE, sample("--height", "100000"), ("--height", "got 100000")),
    case("sample-num-images-a-billion", SAMPLE, sample("--num-images", "1000000000"), ("--num-images",)),
    case("sample-batch-size-a-million", SAMPLE, sample("--batch-size", "1000000"), ("--batch-size", "got 1000000")),
    case("sample-lora-scale-nan", SAMPLE, sample("--lora-scale", "nan"), ("--lora-scale", "got nan")),
    case("sample-lora-is-a-full-model", SAMPLE,
         lambda c: sample_argv(c, c.assets.student, "--lora", full_model_as_lora(c)[1]),
         ("'{ws}/model.safetensors' holds a full model", "not a LoRA")),
    # eval/evaluate.py: the prompt set and the sampling settings, before anything loads
    case("evaluate-prompt-file-a-20mb-line", "eval/evaluate.py",
         evaluate(prompt_file="a red fox\n" + "x" * 20_000_000 + "\n"),
         ("config key 'prompt_file'", "prompt 2", "20,000,000 characters"), absent=("{ws}/ev",)),
    case("evaluate-prompts-too-long", "eval/evaluate.py", evaluate(f"prompts=[{'x' * 20_000}]"),
         ("config key 'prompts[0]'", "20,000 characters"), absent=("{ws}/ev",)),
    case("evaluate-seed-over-63-bits", "eval/evaluate.py", evaluate(f"seed={2**63}"), "config key 'seed'",
         absent=("{ws}/ev",)),
    case("evaluate-seed-plus-prompts-over-63-bits", "eval/evaluate.py",
         evaluate(f"seed={2**63 - 1}", prompt_file="one\ntwo\n"), ("config key 'seed'", "seed + 1 for 2 images"),
         absent=("{ws}/ev",)),
    case("evaluate-guidance-nan", "eval/evaluate.py", evaluate("guidance_scale=.nan"), "config key 'guidance_scale'",
         absent=("{ws}/ev",)),
    case("evaluate-guidance-infinite", "eval/evaluate.py", evaluate("guidance_scale=.inf"),
         ("config key 'guidance_scale'", "got inf"), absent=("{ws}/ev",)),
    case("evaluate-steps-a-million", "eval/evaluate.py", evaluate("steps=1000000"), "config key 'steps'",
         absent=("{ws}/ev",)),
    case("evaluate-batch-size-a-million", "eval/evaluate.py", evaluate("batch_size=1000000"),
         "config key 'batch_size'", absent=("{ws}/ev",)),
    # trainer configs
    case("config-yaml-section-given-a-number", KD, yaml_section_as_number, ("config key 'train'", "got 5")),
    case("config-override-section-given-a-number", KD, kd("sample=3"), ("config key 'sample'", "got 3")),
    case("config-seed-over-64-bits", KD, kd(f"train.seed={SEED_OVER}"), ("config key 'train.seed'", SEED_OVER)),
    case("config-lr-nan", KD, kd("optim.lr=.nan"), "config key 'optim.lr'"),
    case("config-grad-norm-infinite", KD, kd("train.max_grad_norm=.inf"),
         ("config key 'train.max_grad_norm'", "finite")),
    case("config-betas-nan", KD, kd("optim.betas=[.nan,0.9]"), "config key 'optim.betas"),
    case("config-batch-size-a-million", KD, kd("train.batch_size=1000000"), "config key 'train.batch_size'"),
    case("config-num-workers-a-million", KD, kd("train.num_workers=1000000"), "config key 'train.num_workers'"),
    case("config-resolution-100k", KD, kd("data.resolution=100000"), "config key 'data.resolution'"),
    case("config-max-steps-over-31-bits", KD, kd(f"train.max_steps={2**40}"), "config key 'train.max_steps'"),
    case("config-sample-guidance-nan", KD, kd("sample.guidance_scale=.nan"), "config key 'sample.guidance_scale'"),
    case("config-sample-steps-a-million", KD, kd("sample.steps=1000000"), "config key 'sample.steps'"),
    case("config-sample-prompt-too-long", KD, kd(f"sample.prompts=[{'x' * 20_000}]"),
         ("config key 'sample.prompts[0]'", "20,000 characters")),
    case("kd-world-size-without-launcher", KD, kd(), ("WORLD_SIZE=2", "launch.sh"), env={"WORLD_SIZE": "2"},
         absent=("{ws}/out",)),
    # the demo's command line: before Gradio and the models load
    case("demo-guidance-nan", "eval/demo.py", lambda c: ["--guidance", "nan"], ("--guidance", "got nan")),
    case("demo-steps-a-million", "eval/demo.py", lambda c: ["--steps", "1000000"], "--steps"),
    # tools
    case("make-shards-workers-negative", "data/make_shards.py", lambda c: [str(c.ws / "precious"), str(c.ws / "sh"),
                                                                           "--workers", "-1"],
         ("--workers", "got -1"), absent=("{ws}/sh",)),
    case("make-shards-quality-500", "data/make_shards.py", lambda c: [str(c.ws / "precious"), str(c.ws / "sh"),
                                                                      "--quality", "500"],
         ("--quality", "from 1 to 100", "got 500"), absent=("{ws}/sh",)),
    case("make-shards-shard-size-zero", "data/make_shards.py", lambda c: [str(c.ws / "precious"), str(c.ws / "sh"),
                                                                          "--shard-size", "0"],
         ("--shard-size", "got 0"), absent=("{ws}/sh",)),
    case("make-shards-images-without-captions", "data/make_shards.py", images_without_captions,
         ("{ws}/pics/metadata.jsonl: not found", "--caption-column"), absent=("{ws}/shards_out",)),
    case("cache-latents-batch-size-negative", "train/cache_latents.py",
         lambda c: ["--config", TOY, *TINY, f"data.cache={c.ws / 'cache'}", "--batch-size", "-1"],
         ("--batch-size", "got -1"), absent=("{ws}/cache",)),
    case("bench-data-workers-negative", BENCH_DATA, lambda c: ["--workers", "-1"], ("--workers", "got -1")),
    case("bench-data-too-few-images", BENCH_DATA, lambda c: ["--mode", "loader", "--images", "10", "--workers", "2"],
         ("--images 10 is too few for 2 workers", "at least 64")),
    case("bench-data-json-in-a-missing-folder", BENCH_DATA,
         lambda c: ["--json", str(c.ws / "reports" / "data.json")], "folder '{ws}/reports' does not exist"),
    case("bench-kd-step-repeats-zero", BENCH_KD, lambda c: ["--repeats", "0"], ("--repeats", "got 0")),
    case("bench-kd-step-latent-a-million", BENCH_KD, lambda c: ["--latent", "1000000"], "--latent"),
    case("bench-kd-step-json-in-a-missing-folder", BENCH_KD,
         lambda c: ["--json", str(c.ws / "reports" / "kd.json")], "folder '{ws}/reports' does not exist"),
    case("export-single-file-under-a-file", EXPORT,
         lambda c: [str(c.assets.student), "--format", "single-file", "--out",
                    str(c.ws / "precious" / "thesis.tex" / "student.safetensors")],
         ("--out '{ws}/precious/thesis.tex/student.safetensors': cannot be written", "is a file")),
    case("export-diffusers-under-a-file", EXPORT,
         lambda c: [str(c.assets.student), "--format", "diffusers", "--out",
                    str(c.ws / "precious" / "thesis.tex" / "x")],
         "--out '{ws}/precious/thesis.tex/x': cannot be written"),
    case("convert-lora-given-a-full-model", "train/convert_lora.py", full_model_as_lora,
         ("'{ws}/model.safetensors' holds a full model", "not a LoRA"), absent=("{ws}/lora_sdcpp.safetensors",)),
    case("toy-ablation-seed-negative", "eval/toy_ablation.py", lambda c: ["--out", str(c.ws / "abl"), "--seeds", "-1"],
         ("--seeds", "got -1"), absent=("{ws}/abl",)),
    case("toy-ablation-out-under-a-file", "eval/toy_ablation.py",
         lambda c: ["--out", str(c.ws / "precious" / "thesis.tex" / "abl")], "cannot be written"),
    case("toy-ablation-says-its-runs-error-line", "eval/toy_ablation.py", ablation_run_folder_taken,
         ("run bk_small-task_only-seed0 failed: output_dir", "holds no sdkd run"),
         marks=pytest.mark.slow),  # a kd.py process (its Python start, seconds)
]

# A benchmark's report replaces an earlier one only with --overwrite: the user's file stays, nothing is measured.
REPORT_CASES = [
    case(f"{name}-json-exists", script, lambda c: ["--json", str(c.ws / "precious" / "thesis.tex")],
         "--json '{ws}/precious/thesis.tex' exists: pass --overwrite")
    for name, script in [("bench-data", BENCH_DATA), ("bench-kd-step", BENCH_KD),
                         ("bench-inference", "eval/bench_inference.py"), ("bench-decoder", "eval/bench_decoder.py"),
                         ("bench-one-step", "eval/bench_one_step.py"), ("bench-students", "eval/bench_students.py"),
                         ("memory-table", "eval/memory_table.py")]
] + [
    case("gpu-check-out-holds-a-report", "eval/gpu_check.py",
         lambda c: ["--out", str(write(c.ws / "gpu" / "gpu_check.json", "{}").parent)],
         "--out '{ws}/gpu/gpu_check.json' exists: pass --overwrite"),
]

ALL_CASES = CONFIG_CASES + OUTPUT_CASES + CHECKPOINT_CASES + DATA_CASES + MODEL_CASES + SAMPLE_CASES + TOOL_CASES \
    + PROCESS_CASES + REFUSED_START_CASES + H3_CASES + BOUNDS_CASES + REPORT_CASES


# ---------------------------------------------------------------------------------------------
# The test


@pytest.mark.parametrize("hostile", ALL_CASES)
def test_hostile_input_is_one_line_and_changes_nothing(hostile: Case, assets, tmp_path, capfd, monkeypatch, request):
    root = tmp_path
    ws = make_workspace(root)
    ctx = Ctx(ws, root, assets, monkeypatch=monkeypatch)
    # Relative paths and temporary files of the case stay in its root.
    monkeypatch.chdir(ws)
    monkeypatch.setenv("TMPDIR", str(root / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(root / "tmp"))
    for name, value in hostile.env.items():
        monkeypatch.setenv(name, value)
    try:
        argv = hostile.setup(ctx)
        capfd.readouterr()  # what building the assets printed
        before = snapshot(root)
        if hostile.subprocess or ALL_AS_PROCESSES:
            launcher = argv[0].startswith("./")
            command = argv if launcher else [sys.executable, str(ROOT / hostile.script), *argv]
            result = run_script(command, cwd=ROOT if launcher else ws, timeout=300)
            code, stdout, stderr = result.returncode, result.stdout, result.stderr
        else:
            code = run_in_process(hostile.script, argv)
            stdout, stderr = capfd.readouterr()
    finally:
        if ctx.holder is not None:
            ctx.holder.kill()
            ctx.holder.wait()
            ctx.holder.stdin.close()
            ctx.holder.stdout.close()
    after = snapshot(root)

    report = f"exit code {code}; stderr:\n{stderr[-4000:]}\nstdout:\n{stdout[-1500:]}"
    assert code == hostile.code, report
    assert "Traceback" not in stderr, report
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, report
    request.node.user_properties.append(("error_line", errors[0]))  # -o junit_family=legacy --junitxml shows them
    culprits = (hostile.culprit,) if isinstance(hostile.culprit, str) else hostile.culprit
    for culprit in culprits:
        expected = culprit.format(ws=ws, root=root, holder=ctx.holder.pid if ctx.holder else None)
        assert expected in errors[0], f"{expected!r} not named: {errors[0]}"
    others = [line for line in stderr.splitlines() if line.strip() and not line.startswith("error:")]
    unknown = [line for line in others if not any(p.search(line) for p in HARMLESS)]
    assert not unknown, f"unexpected stderr lines: {unknown}\n{report}"
    assert_unchanged(before, after, hostile.may_add)
    for path in [*(Path(p.format(ws=ws, root=root)) for p in hostile.absent), *ctx.absent]:
        assert not path.exists(), f"{path} was written"


def test_case_table_is_large_enough():
    assert len(ALL_CASES) >= 60
    assert sum(c.values[0].subprocess for c in ALL_CASES) <= 6
