"""Multi-process training and cluster sweeps, on CPU: DDP with 2 gloo processes, SLURM and side-by-side launchers."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file

from dreambooth_pl.training.module import DreamBoothModule
from tests.conftest import DREAMBOOTH_ROOT, FAST, REPO, needs_dataset
from tests.test_evaluate import QUICK
from tests.test_faults import train_py as faults_train_py
from tests.test_sigterm import SigtermAt


class SampleSeededModule(DreamBoothModule):
    """Draws each sample's latent, noise and timestep from a seed of (step, image view) alone.

    DreamBoothModule draws from one generator per rank (seed + rank), so 2 ranks x batch 1 and 1 process
    x batch 2 see different noise by design. With draws tied to the sample instead, both runs compute the
    same loss on the same global batch, and their updates must agree: what is left to differ is only how
    the batch is split, the gradients averaged and the loss reduced.
    """

    def _generator(self, key: str) -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(f"{self.global_step}/{key}".encode()))

    def encode_images(self, pixel_values, cache_keys=None):
        latents = []
        for i, key in enumerate(cache_keys):
            self.noise_generator = self._generator(f"latent/{key}")
            latents.append(super().encode_images(pixel_values[i : i + 1], [key]))
        return torch.cat(latents)

    def compute_loss(self, batch, noise=None, timesteps=None):
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (self.unet.config.in_channels, *(size // scale for size in batch["pixel_values"].shape[2:]))
        generators = [self._generator(f"noise/{key}") for key in batch["cache_keys"]]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators])
        return super().compute_loss(batch, noise, timesteps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("test/global_loss", loss, sync_dist=True, batch_size=len(batch["prompts"]))  # mean over ranks
        return loss


# Plain SGD without clipping: the update is lr x gradient, so the runs' weights compare gradients exactly.
COMPARABLE = [
    *FAST,
    "logger=csv",
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.gradient_clip_val=null",
    "module._target_=tests.test_distributed.SampleSeededModule",
    "module.optimizer._target_=torch.optim.SGD",
    "~module.optimizer.betas",
    "~module.optimizer.eps",
    "module.optimizer.lr=0.05",
    "module.optimizer.weight_decay=0",
    "export.samples.prompts=[]",
]


def train_py(args: list[str], cwd: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cwd.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / "train.py"), *args]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metric(run: Path, name: str) -> list[float]:
    rows = csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open())
    return [float(row[name]) for row in rows if row.get(name)]


def unet_weights(pipeline: Path) -> dict[str, torch.Tensor]:
    return load_file(next((pipeline / "unet").glob("*.safetensors")))


@pytest.mark.slow
@needs_dataset
def test_ddp_matches_one_process_on_the_same_global_batch(tmp_path, cache_dir, tiny_pretrained):
    """2 gloo processes x batch 1 against 1 process x batch 2 reading the same items, both through train.py."""
    paths = [
        f"paths.cache_dir={cache_dir}",
        f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
        f"prior.cache.cache_dir={tmp_path / 'class_images'}",  # empty: both ranks have images to make
    ]
    ddp = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "data.batch_size=1",
    ]
    # Validation on rank 0 only, read by the toy readers, exporting the last step: the weights must not move.
    ddp += ["eval=toy", "validation.enabled=true", "validation.select=last", "validation.every_n_steps=2"]
    ddp += ["validation.images_per_prompt=1", "validation.sampler.num_inference_steps=2"]
    # The default, time-stamped run folder: the re-run rank-1 process must find the same one.
    train_py([*COMPARABLE, *paths, *ddp, f"paths.log_dir={tmp_path / 'ddp' / 'logs'}"], cwd=tmp_path)
    (run,) = (tmp_path / "ddp" / "logs" / "train" / "runs" / "teapot").iterdir()
    one = ["data.batch_size=2"]
    train_py([*COMPARABLE, *paths, *one, f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    single = tmp_path / "single"

    # Rank 0 alone exports and logs; rank 1 logs its console to the same folder.
    assert [p.parent.name for p in run.rglob("model_index.json")] == ["pipeline"]
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]
    assert {p.name for p in run.glob("*.log")} == {"train.log", "train_ddp_process_1.log"}
    assert [row.split(",")[0] for row in (run / "validation" / "metrics.csv").read_text().splitlines()] == [
        "step", "0", "2"
    ]  # fmt: skip
    assert "Validation at step" not in (run / "train_ddp_process_1.log").read_text()

    # Class images: each rank made its half; the single run found all of them.
    pattern = r"generating (\d+) of 4 .*\(rank (\d) of 2\)"
    made = {
        int(rank): int(count)
        for log in ("train.log", "train_ddp_process_1.log")
        for count, rank in re.findall(pattern, (run / log).read_text())
    }
    assert made == {0: 2, 1: 2}
    assert "Class images: all 4 for 'a teapot' are cached" in (single / "train.log").read_text()
    manifest = next((tmp_path / "class_images").glob("a_teapot-*/manifest.json")).read_text()
    assert all(f"0000{i}.png" in manifest for i in range(4))

    # Same global batch, same loss at both steps (step 2 runs on the updated weights).
    single_loss = metric(single, "train/loss")
    assert len(single_loss) == 2
    assert metric(run, "test/global_loss") == pytest.approx(single_loss, rel=1e-5)
    assert metric(run, "train/loss") != pytest.approx(single_loss, rel=1e-3)  # rank 0's own half differs

    base = unet_weights(Path(tiny_pretrained))
    after = {"ddp": unet_weights(run / "pipeline"), "single": unet_weights(single / "pipeline")}
    delta = {k: torch.cat([(w[n] - base[n]).flatten() for n in sorted(base)]) for k, w in after.items()}
    assert delta["single"].abs().max() > 1e-4
    torch.testing.assert_close(delta["ddp"], delta["single"], rtol=0, atol=1e-4 * delta["single"].abs().max().item())


def test_slurm_launcher_config_requests_the_gpus():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = [
        "hydra/launcher=slurm_gpu",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=600",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    expected = {"gpus_per_node": 4, "tasks_per_node": 4, "nodes": 2, "partition": "gpu", "timeout_min": 600}
    assert {k: launcher.params[k] for k in expected} == expected
    assert launcher.params["cpus_per_task"] > 0 and launcher.params["mem_gb"] > 0
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy") and cfg.trainer.devices == "auto"


def test_slurm_jobs_are_signalled_with_what_lightning_requeues_on():
    """The job script asks SLURM for the signal Lightning's SLURM environment saves a checkpoint and
    requeues on, not submitit's default (USR2), which would kill the job without a checkpoint."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from submitit.slurm.slurm import _make_sbatch_string

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm_gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    script = _make_sbatch_string(
        command="python train.py",
        folder="/tmp/submitit",
        signal_delay_s=launcher.signal_delay_s,
        additional_parameters=dict(launcher.additional_parameters),
    )
    signals = [line for line in script.splitlines() if line.startswith("#SBATCH --signal")]
    requeue_signal = SLURMEnvironment().requeue_signal.name.removeprefix("SIG")
    assert signals == [f"#SBATCH --signal={requeue_signal}@{launcher.signal_delay_s}"]


def test_fsdp_config_builds_the_strategy():
    """Lightning runs FSDP on CUDA only, so on CPU the strategy object is built but not trained."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"
    assert strategy.kwargs["use_orig_params"]  # mixed frozen and trainable weights in one unit
    assert cfg.trainer.precision == "32-true" and cfg.trainer.gradient_clip_val is None


def toy_sweep_numbers(tmp_path: Path, name: str, *launcher: str) -> tuple[str, dict[str, bytes]]:
    """A cut-down experiment=toy_paper sweep: 2 rows x (a refused setting, 2 steps), evaluated, with its
    report and control rows; its console output and every number it wrote (jobs' and controls' metrics, the
    report's tables), by file."""
    sweep = tmp_path / name
    command = ["-m", "experiment=toy_paper", "subject=heldout_teapot", "toy_row=dreambooth,lora"]
    command += ["trainer.max_steps=0,2", "logger=none", "prior.num_images=2", "sampler.num_inference_steps=2"]
    command += ["callbacks.samples.every_n_steps=0", "validation.enabled=false", "export.samples.prompts=[]"]
    command += [*QUICK, "eval.images_per_prompt=2", f"hydra.sweep.dir={sweep}"]
    command += [f"paths.cache_dir={tmp_path / f'{name}-cache'}", *launcher]  # each sweep makes everything itself
    output = faults_train_py(command, tmp_path, expect=1)
    numbers = {
        str(path.relative_to(sweep)): json.dumps(
            {k: json.loads(path.read_text())[k] for k in ("metrics", "per_prompt")}
        )
        for path in sweep.glob("**/eval/metrics.json")
    }
    numbers |= {f"report/{f}": (sweep / "report" / f).read_text() for f in ("table1.csv", "table3.csv", "paired.csv")}
    return output, numbers


@pytest.mark.slow  # two sweeps of 4 jobs with their control rows: about 70 s on 2 busy cores
def test_a_sweep_side_by_side_gives_the_numbers_of_one_after_another(tmp_path):
    """hydra/launcher=cpu_parallel runs a sweep's jobs in joblib's worker processes: the jobs' metrics, the
    control rows and the report's tables are those of the basic launcher, to the last digit, and the refused
    jobs are recorded and named the same way; each console line from a job names it."""
    basic, expected = toy_sweep_numbers(tmp_path, "basic")
    side_by_side, numbers = toy_sweep_numbers(
        tmp_path, "parallel", "hydra/launcher=cpu_parallel", "hydra.launcher.n_jobs=2"
    )
    assert "Joblib.Parallel(n_jobs=2," in side_by_side and "Joblib" not in basic
    jobs = sorted(k.split("/")[0] for k in expected if k.endswith("metrics.json") and k[0].isdigit())
    assert jobs == ["1", "3"] and len(expected) == 2 + 4 + 3  # trained jobs, control rows, tables
    assert numbers == expected
    for job, row in (("0", "dreambooth"), ("2", "lora")):
        swept = f"subject=heldout_teapot seed=100 toy_row={row} trainer.max_steps=0"
        failure = f"\n  job {job} ({swept}): Invalid config: trainer.max_steps=0 must be >= 1"
        assert failure in basic and failure in side_by_side
    assert f"[sweep] 2 job(s) of {tmp_path / 'parallel'} failed:" in side_by_side
    assert re.search(r"^\[job 3\]\[.*\] - Eval of heldout_teapot: ", side_by_side, re.M)
    assert not re.search(r"^\[job \d", basic, re.M)


@pytest.mark.slow
@needs_dataset
def test_ddp_resumes_mid_epoch_to_the_same_weights(tmp_path, cache_dir):
    """Each rank's data position and noise stream travel in the checkpoint: a 2-process run resumed
    mid-epoch ends with the weights of an uninterrupted one."""
    common = [
        *FAST,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "export.samples.prompts=[]",
        f"paths.cache_dir={cache_dir}",
        f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
    ]
    # 5 teapot photos on 2 ranks: 2 steps an epoch, so the step-3 checkpoint is mid-epoch.
    straight = [*common, "callbacks.checkpoint.every_n_train_steps=3", "callbacks.checkpoint.save_top_k=-1"]
    straight.append(f"hydra.run.dir={tmp_path / 'straight'}")
    train_py(straight, tmp_path)
    (checkpoint,) = (tmp_path / "straight" / "checkpoints").glob("*step=3.ckpt")
    train_py([*common, f"ckpt_path='{checkpoint}'", f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path)
    a, b = (unet_weights(tmp_path / run / "pipeline") for run in ("straight", "resumed"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0


class SigtermRankZero(SigtermAt):
    """SIGTERM to rank 0 alone (as `kill <pid>` would): rank 0 forwards it to the ranks it started, which see it
    later, so where they stop is up to the ranks' agreement."""

    def fire(self, trainer, hook):
        if trainer.is_global_zero:
            super().fire(trainer, hook)


@pytest.mark.slow
@needs_dataset
def test_ddp_sigterm_inside_an_accumulation_window_resumes_to_the_same_weights(tmp_path, cache_dir):
    """Each rank's partial gradient sums of the open window travel in the checkpoint, and the ranks stop at
    the same batch: the resumed 2-process run ends with the uninterrupted run's weights, bit for bit."""
    common = [
        *FAST,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=3",
        "trainer.accumulate_grad_batches=2",  # 2 batches a rank an epoch: one window an epoch
        "export.samples.prompts=[]",
        f"paths.cache_dir={cache_dir}",
        f"paths.dreambooth_root={DREAMBOOTH_ROOT}",
    ]
    train_py([*common, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path)
    # Step 1's first batch: the signal lands after the window's first micro-batch of 2.
    signal = "+callbacks.sigterm={_target_:tests.test_distributed.SigtermRankZero,step:1,hook:on_train_batch_start}"
    stopped = train_py([*common, signal, f"hydra.run.dir={tmp_path / 'stopped'}"], tmp_path, returncode=143)
    checkpoint = torch.load(tmp_path / "stopped" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 1, stopped.stderr[-3000:]
    assert checkpoint["accumulated_gradients"]  # one row per rank: the ranks' sums differ
    grads = next(iter(checkpoint["accumulated_gradients"].values()))
    assert grads.shape[0] == 2 and not torch.equal(grads[0], grads[1])
    resume = f"ckpt_path='{tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}'"
    train_py([*common, resume, f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path)
    a, b = (unet_weights(tmp_path / run / "pipeline") for run in ("straight", "resumed"))
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"
