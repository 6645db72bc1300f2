"""Pretraining the toy world's models from rendered data, stage by stage, each saved when it ends.

Stages (each reads what earlier stages saved under `out_dir`, so a crash loses only the running one):
  data      render the captioned pretraining set (cached under the cache folder, not shipped)
  vae       AutoencoderKL, reconstruction + KL                  -> out_dir/pipeline/vae
  clip      CLIPModel, contrastive on (image, caption)          -> out_dir/clip (+ its text tower and
            tokenizer become the pipeline's text_encoder/tokenizer: one text model, trained once)
  dino      ViTModel, InfoNCE: an instance's photos against look-alikes -> out_dir/dino
  unet      UNet2DConditionModel, epsilon loss, caption dropout -> out_dir/pipeline (complete)
  subjects  the toy subjects' photos and prompts_and_classes.txt -> out_dir/dataset (close-ups: out_dir/closeups)
  probe     held-out class x context x colour prompts, read back by the toy CLIP and by an attribute
            classifier trained on rendered images                       -> out_dir/probe
  prior     colour entropy of class images ("a teapot") per guidance scale, against pretraining -> out_dir/prior
  readers   do the evaluators read the subject and diversity? (toyworld/readers.py) -> out_dir/readers
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer, ViTConfig, ViTModel

from dreambooth_pl.util.config import ConfigError
from dreambooth_pl.runs.export import save_pipeline_atomically, write_dir_atomically
from dreambooth_pl.models.families import Components, get_family
from dreambooth_pl.util.images import image_grid, save_atomically
from dreambooth_pl.models.objectives import snr_weights
from dreambooth_pl.training.losses import dreambooth_loss
from dreambooth_pl.models.pipelines import load_pipeline
from dreambooth_pl.models.sampling import SamplerSettings, render
from dreambooth_pl.toyworld import scenes
from dreambooth_pl.toyworld.prior import class_prior, save_prior
from dreambooth_pl.toyworld.readers import identity_groups, save_readers, validate_readers
from dreambooth_pl.toyworld.subjects import write_closeups, write_subjects
from dreambooth_pl.text.vocab import build_clip_tokenizer, word_vocab

log = logging.getLogger(__name__)

STAGES = ("data", "vae", "clip", "dino", "unet", "subjects", "probe", "prior", "readers")


# --------------------------------------------------------------------------- data


@dataclass
class WorldData:
    """The rendered pretraining set: `views` photos of each instance, each with its own caption."""

    images: np.ndarray  # N x H x W x 3 uint8
    captions: list[str]
    instance: np.ndarray  # N: which instance each image shows (views of one instance are adjacent)
    cls: np.ndarray  # N: index into scenes.CLASSES
    context: np.ndarray  # N: index into scenes.CONTEXTS
    colour: np.ndarray  # N: index into the colour names, or -1 when the caption names no colour

    def pixels(self, index) -> torch.Tensor:
        """Images as the models take them: N x 3 x H x W in [-1, 1]."""
        return torch.from_numpy(self.images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_world(
    num_instances: int, views: int, size: int, colour_word_prob: float, plain_prob: float, seed: int
) -> WorldData:
    """Each instance is photographed `views` times in random contexts, never in a held-out (class, context)."""
    rng = np.random.default_rng(seed)
    held_out = scenes.held_out_pairs()
    colours = list(scenes.COLOURS)
    images, captions, inst_ids, cls_ids, ctx_ids, col_ids = [], [], [], [], [], []
    for i in tqdm(range(num_instances), desc="render world", unit="inst", mininterval=5):
        inst = scenes.sample_instance(rng)
        allowed = [c for c in scenes.CONTEXTS[1:] if (inst.cls, c) not in held_out]
        for _ in range(views):
            context = "" if rng.random() < plain_prob else allowed[rng.integers(len(allowed))]
            named = rng.random() < colour_word_prob
            images.append(np.asarray(scenes.render(inst, scenes.sample_view(rng, context), size)))
            captions.append(scenes.caption(inst.cls, context, inst.colour if named else None))
            inst_ids.append(i)
            cls_ids.append(scenes.CLASSES.index(inst.cls))
            ctx_ids.append(scenes.CONTEXTS.index(context))
            col_ids.append(colours.index(inst.colour) if named else -1)
    return WorldData(np.stack(images), captions, *(np.asarray(a) for a in (inst_ids, cls_ids, ctx_ids, col_ids)))


def load_or_render_world(cache_dir: str, spec: dict) -> WorldData:
    """Rendering takes minutes, so the set is cached under a name that hashes its spec."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"world-{digest}.npz"
    if path.exists():
        with np.load(path) as f:
            return WorldData(
                f["images"], [str(c) for c in f["captions"]], f["instance"], f["cls"], f["context"], f["colour"]
            )
    data = render_world(**spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        images=data.images,
        captions=np.asarray(data.captions),
        instance=data.instance,
        cls=data.cls,
        context=data.context,
        colour=data.colour,
    )
    tmp.replace(path)
    return data


def world_words(extra_words: list[str]) -> list[str]:
    """Every word a caption or a toy evaluation prompt uses, then the extra (never captioned) words."""
    words = ["a", *scenes.COLOURS, *scenes.CLASSES]
    for context in scenes.CONTEXTS:
        words += context.split()
    seen = dict.fromkeys(words)
    clash = [w for w in extra_words if w in seen]
    if clash:
        raise ValueError(f"toyworld.tokenizer.extra_words {clash} appear in captions: identifiers must be rare")
    return [*seen, *extra_words]


# --------------------------------------------------------------------------- training helpers


def _plain(cfg: DictConfig) -> dict:
    """Model constructors store their arguments as JSON config: they need plain lists, not ListConfig."""
    return OmegaConf.to_container(cfg, resolve=True)


def _batches(rng: np.random.Generator, n: int, batch_size: int, steps: int) -> Iterator[np.ndarray]:
    for _ in range(steps):
        yield rng.integers(0, n, batch_size)


def _optimizer(params, lr: float, steps: int, warmup: int):
    """AdamW with linear warm-up and cosine decay: short runs still end at a low learning rate."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _caption_batches(rng: np.random.Generator, data: WorldData, cfg: DictConfig) -> Iterator[np.ndarray]:
    """A stage's batches of rendered (image, caption) indices."""
    return _batches(rng, len(data.captions), cfg.batch_size, cfg.steps)


def _train(name: str, model: torch.nn.Module, loss_fn, batches, cfg: DictConfig) -> list[float]:
    """The shared loop over a stage's `steps` at its `lr` and `warmup`: returns the loss of every step (the
    tests check that it falls)."""
    steps = cfg.steps
    opt, sched = _optimizer([p for p in model.parameters() if p.requires_grad], cfg.lr, steps, cfg.warmup)
    model.train()
    losses = []
    bar = tqdm(batches, total=steps, desc=name, unit="step", mininterval=10)
    for index in bar:
        loss = loss_fn(index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    model.eval()
    return losses


def _save(model, target: Path, tokenizer=None) -> None:
    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    write_dir_atomically(target, write)


# --------------------------------------------------------------------------- stages


def train_vae(data: WorldData, cfg: DictConfig, out: Path, seed: int) -> list[float]:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**_plain(cfg.model))
    rng = np.random.default_rng(seed)

    def loss_fn(index):
        # Random crops: the VAE is convolutional (no mid-block attention), so crops train it 4x faster.
        top, left = rng.integers(0, data.images.shape[1] - cfg.crop + 1, 2)
        x = data.pixels(index)[:, :, top : top + cfg.crop, left : left + cfg.crop]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        return F.mse_loss(rec, x) + F.l1_loss(rec, x) + cfg.kl_weight * posterior.kl().mean()

    losses = _train("vae", vae, loss_fn, _caption_batches(rng, data, cfg), cfg)
    with torch.no_grad():  # unit-variance latents, as Stable Diffusion's scaling factor gives
        sample = vae.encode(data.pixels(rng.integers(0, len(data.captions), 256))).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    _save(vae, out / "pipeline" / "vae")
    return losses


def build_tokenizer(cfg: DictConfig) -> CLIPTokenizer:
    return build_clip_tokenizer(*word_vocab(world_words(list(cfg.extra_words))), model_max_length=cfg.model_max_length)


def train_clip(data: WorldData, cfg: DictConfig, tok_cfg: DictConfig, out: Path, seed: int) -> list[float]:
    torch.manual_seed(seed)
    tok = build_tokenizer(tok_cfg)
    config = CLIPConfig(
        text_config={
            **_plain(cfg.text),
            "vocab_size": len(tok),
            "max_position_embeddings": tok.model_max_length,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={**_plain(cfg.vision), "image_size": data.images.shape[1]},
        projection_dim=cfg.projection_dim,
    )
    model = CLIPModel(config)
    rng = np.random.default_rng(seed)
    tokens = tok(data.captions, padding="max_length", truncation=True, return_tensors="pt")

    def loss_fn(index):
        return model(
            input_ids=tokens.input_ids[index],
            attention_mask=tokens.attention_mask[index],
            pixel_values=data.pixels(index),
            return_loss=True,
        ).loss

    losses = _train("clip", model, loss_fn, _caption_batches(rng, data, cfg), cfg)
    rare = list(tok_cfg.extra_words)
    seen = [w for w in world_words(rare) if w not in rare]
    give_rare_words_typical_embeddings(model.text_model, tok, rare, seen, seed)
    _save(model, out / "clip", tok)
    # The pipeline's text encoder is the CLIP text tower (as Stable Diffusion's is OpenAI CLIP's).
    _save(model.text_model, out / "pipeline" / "text_encoder")
    write_dir_atomically(out / "pipeline" / "tokenizer", tok.save_pretrained)
    return losses


def give_rare_words_typical_embeddings(text_model, tok, rare: list[str], seen: list[str], seed: int) -> None:
    """A word no caption uses keeps its initial, short embedding, so "a sks teapot" would reach the UNet
    almost as "a teapot" and the identifier could hardly be told from the class. A real CLIP's rare tokens
    were seen a few times and have embeddings of ordinary length that mean little: random directions at the
    median length of the caption words' embeddings give the toy identifiers the same."""
    table = text_model.get_input_embeddings().weight
    ids = tok.convert_tokens_to_ids([f"{w}</w>" for w in rare])
    with torch.no_grad():
        length = table[tok.convert_tokens_to_ids([f"{w}</w>" for w in seen])].norm(dim=-1).median()
        directions = torch.randn(len(ids), table.shape[1], generator=torch.Generator().manual_seed(seed))
        table[ids] = F.normalize(directions, dim=-1) * length


def train_dino(cfg: DictConfig, out: Path, size: int, seed: int) -> list[float]:
    """Instance discrimination against look-alikes. Each group is an instance photographed as a subject is,
    the same instance in an evaluation context, and a look-alike (same class and main colour, another pattern,
    second colour or proportions) posed exactly as the second photo; an instance's two photos must be nearer
    each other than any other group's photos or any look-alike in the batch. Views of random instances alone
    teach class and main colour, which every look-alike shares: that reader failed the readers test. The
    groups are rendered here from their own seed, with the pretraining and the subjects' patterns: not the
    data the UNet saw, nor the readers stage's test instances."""
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(**_plain(cfg.model), image_size=size), add_pooling_layer=False)
    rng = np.random.default_rng([seed, 5])
    patterns = [p for p in (*scenes.SUBJECT_PATTERNS, *scenes.PRETRAIN_PATTERNS) if p != "plain"]
    rendered = identity_groups(rng, cfg.groups, scenes.LOOKALIKES, size, patterns)
    groups = np.stack([np.stack([np.asarray(image) for image in part]) for part in rendered], 1)  # G x 3 x H x W x 3

    def loss_fn(pick: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(groups[pick]).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0  # B x 3 x C x H x W
        flip_anchor, flip_pair = (torch.from_numpy(rng.random(len(pick)) < 0.5) for _ in range(2))
        x[flip_anchor, 0] = x[flip_anchor, 0].flip(-1)
        x[flip_pair, 1:] = x[flip_pair, 1:].flip(-1)  # the look-alike keeps the positive's pose
        z = F.normalize(model(pixel_values=x.flatten(0, 1)).last_hidden_state[:, 0], dim=-1).unflatten(0, (-1, 3))
        anchor, positive, lookalike = z.unbind(1)
        target = torch.arange(len(pick))
        loss_a = F.cross_entropy(anchor @ torch.cat([positive, lookalike]).T / cfg.temperature, target)
        loss_p = F.cross_entropy(positive @ torch.cat([anchor, lookalike]).T / cfg.temperature, target)
        return (loss_a + loss_p) / 2

    batches = (rng.choice(len(groups), cfg.batch_size, replace=False) for _ in range(cfg.steps))
    losses = _train("dino", model, loss_fn, batches, cfg)
    _save(model, out / "dino")
    return losses


def train_unet(data: WorldData, cfg: DictConfig, scheduler_cfg: DictConfig, out: Path, seed: int) -> list[float]:
    """Text-to-image on frozen VAE latents and frozen text embeddings; dropped captions teach the
    unconditional prediction that classifier-free guidance needs."""
    torch.manual_seed(seed)
    pipe_dir = out / "pipeline"
    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(pipe_dir / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(pipe_dir / "tokenizer")
    noise_scheduler = DDPMScheduler(**_plain(scheduler_cfg))
    unet = UNet2DConditionModel(**_plain(cfg.model), cross_attention_dim=text_encoder.config.hidden_size)

    with torch.no_grad():
        moments = torch.cat(
            [
                vae.encode(data.pixels(np.arange(i, min(i + 256, len(data.captions))))).latent_dist.parameters
                for i in tqdm(range(0, len(data.captions), 256), desc="encode latents", mininterval=10)
            ]
        )
        unique = sorted(set(data.captions)) + [""]
        ids = tok(unique, padding="max_length", truncation=True, return_tensors="pt").input_ids
        embeddings = torch.cat([text_encoder(ids[i : i + 256])[0] for i in range(0, len(ids), 256)])
    caption_index = torch.tensor([unique.index(c) for c in data.captions])
    empty = len(unique) - 1
    scale = vae.config.scaling_factor
    rng = np.random.default_rng(seed)

    def loss_fn(index):
        mean, logvar = moments[index].chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)) * scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        text = caption_index[index].clone()
        text[torch.from_numpy(rng.random(len(index)) < cfg.caption_dropout)] = empty
        pred = unet(noisy, t, encoder_hidden_states=embeddings[text]).sample
        weights = None
        if cfg.snr_gamma is not None:
            schedule = noise_scheduler.alphas_cumprod
            weights = snr_weights(schedule, t, cfg.snr_gamma, noise_scheduler.config.prediction_type)
        # the project's loss (losses.py): per-sample MSE, Min-SNR weighted; no prior half in pretraining
        return dreambooth_loss(pred, noise, torch.zeros(len(index), dtype=torch.bool), 0.0, weights).total

    losses = _train("unet", unet, loss_fn, _caption_batches(rng, data, cfg), cfg)
    parts = Components(unet, vae, noise_scheduler, {"text_encoder": text_encoder}, {"tokenizer": tok})
    pipe = get_family("sd").assemble_pipeline(parts)
    save_pipeline_atomically(pipe, pipe_dir)
    return losses


class AttributeProbe(torch.nn.Module):
    """A small CNN trained on rendered images to name class, context and colour: the renderer's known
    attributes, read back from generated images. Trained with blur, since generated images are blurrier."""

    def __init__(self, width: int):
        super().__init__()
        widths = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[torch.nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [torch.nn.Conv2d(a, b, 3, stride=2, padding=1), torch.nn.GroupNorm(8, b), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        sizes = (len(scenes.CLASSES), len(scenes.CONTEXTS), len(scenes.COLOURS))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(widths[-1], n) for n in sizes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(x)
        return [head(features) for head in self.heads]

    @torch.no_grad()
    def read(self, images) -> list[tuple[str, str, str]]:
        pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
        logits = self(pixels.float() / 127.5 - 1.0)
        cls, ctx, col = (lg.argmax(-1).tolist() for lg in logits)
        names = list(scenes.COLOURS)
        return [(scenes.CLASSES[a], scenes.CONTEXTS[b], names[c]) for a, b, c in zip(cls, ctx, col)]


def train_attribute_probe(data: WorldData, cfg: DictConfig, seed: int) -> AttributeProbe:
    torch.manual_seed(seed)
    model = AttributeProbe(cfg.width)
    rng = np.random.default_rng(seed)
    labels = [torch.from_numpy(a).long() for a in (data.cls, data.context, data.colour)]

    def loss_fn(index):
        x = data.pixels(index)
        blur = torch.from_numpy(rng.random(len(index)) < 0.5)
        x[blur] = F.interpolate(F.avg_pool2d(x[blur], 2), scale_factor=2, mode="bilinear")
        logits = model(x)
        # the colour is known only where the caption names it (-1 elsewhere)
        return sum(F.cross_entropy(lg, lb[index], ignore_index=-1) for lg, lb in zip(logits, labels))

    losses = _train("attribute probe", model, loss_fn, _caption_batches(rng, data, cfg), cfg)
    model.losses = [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))]  # first and last 10 steps
    return model


def probe(data: WorldData, attribute_probe: AttributeProbe, cfg: DictConfig, out: Path, seed: int) -> dict:
    """Does the base model follow text it never saw as a whole? Generate each held-out (class, context)
    pair in a few colours and read class, context and colour back, with the toy CLIP (zero-shot) and with
    an attribute probe trained on rendered images, beside the same readings of the renderer's own images
    of those prompts (each reader's ceiling)."""
    rng = np.random.default_rng(seed)
    colours = list(scenes.COLOURS)
    prompts, truth = [], []
    for cls, context in sorted(scenes.held_out_pairs()):
        for colour in rng.choice(colours, cfg.colours_per_pair, replace=False):
            prompts.append(scenes.caption(cls, context, str(colour)))
            truth.append((cls, context, str(colour)))
    prompts_rep = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    truth_rep = [t for t in truth for _ in range(cfg.images_per_prompt)]
    settings = SamplerSettings(**cfg.sampler)
    with torch.no_grad():
        pipe = load_pipeline(str(out / "pipeline"), device="cpu")
        seeds = [seed + i for i in range(len(prompts_rep))]
        generated = [image for _, image in render(pipe, prompts_rep, seeds, settings, desc="probe")]
        del pipe
    rendered = []
    for cls, context, colour in truth_rep:
        inst = scenes.sample_instance(rng, cls).recoloured(colour)
        rendered.append(scenes.render(inst, scenes.sample_view(rng, context), settings.resolution))
    result = {
        "prompts": len(prompts),
        "images": len(prompts_rep),
        "chance": {
            "class": 1 / len(scenes.CLASSES),
            "context": 1 / (len(scenes.CONTEXTS) - 1),
            "colour": 1 / len(colours),
        },
        "probe_loss": attribute_probe.losses,
    }
    for reader_name, reader in (("clip", CaptionReader(out / "clip")), ("attribute_probe", attribute_probe)):
        for name, images in (("generated", generated), ("rendered", rendered)):
            read = reader.read(images)
            result[f"{reader_name}/{name}"] = {
                attr: float(np.mean([r[k] == t[k] for r, t in zip(read, truth_rep)]))
                for k, attr in enumerate(("class", "context", "colour"))
            }
    (out / "probe").mkdir(parents=True, exist_ok=True)
    (out / "probe" / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    cols = cfg.images_per_prompt
    rows = [generated[i * cols : (i + 1) * cols] + rendered[i * cols : i * cols + 1] for i in range(len(prompts))]
    save_atomically(
        image_grid([im for row in rows[:: cfg.grid_every] for im in row], cols=cols + 1), out / "probe" / "grid.png"
    )
    (out / "probe" / "grid.txt").write_text("\n".join(prompts[:: cfg.grid_every]) + "\n")
    return result


class CaptionReader:
    """Zero-shot reading with the toy CLIP: the best of every class x context x colour caption."""

    def __init__(self, clip_dir: Path):
        self.model = CLIPModel.from_pretrained(clip_dir).eval()
        self.tok = CLIPTokenizer.from_pretrained(clip_dir)
        self.options = [
            (cls, ctx, col) for cls in scenes.CLASSES for ctx in scenes.CONTEXTS[1:] for col in scenes.COLOURS
        ]
        tokens = self.tok(
            [scenes.caption(*o[:2], o[2]) for o in self.options],
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            text = self.model.get_text_features(**tokens)
        self.text = F.normalize(text if isinstance(text, torch.Tensor) else text.pooler_output, dim=-1)

    @torch.no_grad()
    def read(self, images) -> list[tuple[str, str, str]]:
        pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
        feats = self.model.get_image_features(pixel_values=pixels.float() / 127.5 - 1.0)
        feats = F.normalize(feats if isinstance(feats, torch.Tensor) else feats.pooler_output, dim=-1)
        return [self.options[i] for i in (feats @ self.text.T).argmax(-1).tolist()]


# --------------------------------------------------------------------------- the command


def build(cfg: DictConfig) -> dict:
    """Run the selected stages in order; print each one's time; return their losses and the probe."""
    if not isinstance(cfg.stages, ListConfig):
        raise ConfigError(f"stages={cfg.stages!r} must be a list, e.g. stages=[vae,clip]: choose from {list(STAGES)}")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"toyworld stages {unknown} unknown: choose from {list(STAGES)}")
    if not 0 < cfg.closeups.crop < 1:  # before the stages ahead of `subjects` train for an hour
        raise ConfigError(f"closeups.crop={cfg.closeups.crop} must be between 0 and 1 (the share of the height shown)")
    out = Path(cfg.out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results: dict = {}
    data = None
    classifier = None

    def world() -> WorldData:
        nonlocal data
        if data is None:
            data = load_or_render_world(cfg.cache_dir, {**OmegaConf.to_container(cfg.data), "seed": cfg.seed})
        return data

    def attribute_probe() -> AttributeProbe:
        """Trained once for the probe and prior stages (not saved: minutes to retrain)."""
        nonlocal classifier
        if classifier is None:
            classifier = train_attribute_probe(world(), cfg.probe.classifier, cfg.seed)
        return classifier

    for stage in [s for s in STAGES if s in cfg.stages]:
        start = time.perf_counter()
        if stage == "data":
            world()
        elif stage == "vae":
            results["vae"] = train_vae(world(), cfg.vae, out, cfg.seed)
        elif stage == "clip":
            results["clip"] = train_clip(world(), cfg.clip, cfg.tokenizer, out, cfg.seed)
        elif stage == "dino":
            results["dino"] = train_dino(cfg.dino, out, cfg.data.size, cfg.seed)
        elif stage == "unet":
            results["unet"] = train_unet(world(), cfg.unet, cfg.scheduler, out, cfg.seed)
        elif stage == "subjects":
            write_subjects(cfg.subjects, out / "dataset", cfg.data.size)
            write_closeups(cfg.subjects, out / "closeups", cfg.data.size, cfg.closeups.crop)
        elif stage == "probe":
            results["probe"] = probe(world(), attribute_probe(), cfg.probe, out, cfg.seed)
        elif stage == "prior":
            results["prior"] = class_prior(world(), attribute_probe(), cfg.prior, out, cfg.data.size, cfg.seed)
            save_prior(results["prior"], out / "prior")
        elif stage == "readers":
            results["readers"] = validate_readers(cfg.readers, out, cfg.data.size, cfg.seed)
            save_readers(results["readers"], cfg.readers, out / "readers")
        elapsed = time.perf_counter() - start
        losses = results.get(stage)
        detail = ""
        if isinstance(losses, list) and losses:
            k = max(1, len(losses) // 10)
            detail = f", loss {np.mean(losses[:k]):.4f} -> {np.mean(losses[-k:]):.4f}"
        print(f"[toyworld] stage {stage}: {elapsed:.1f} s{detail}", flush=True)
    return results
