"""The pretraining stages that train the toy world's models: the VAE, CLIP (whose text tower and tokenizer
the pipeline uses), the DINO reader and the UNet, each saved when it ends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer, ViTConfig, ViTModel

from dreambooth_pl.models.families import Components, get_family
from dreambooth_pl.models.objectives import snr_weights
from dreambooth_pl.runs.export import save_pipeline_atomically, write_dir_atomically
from dreambooth_pl.text.vocab import build_clip_tokenizer, word_vocab
from dreambooth_pl.toyworld import scenes
from dreambooth_pl.toyworld.loop import caption_batches, plain, save_model, train_loop
from dreambooth_pl.toyworld.readers import identity_groups
from dreambooth_pl.toyworld.world import WorldData, world_words
from dreambooth_pl.training.losses import dreambooth_loss


def train_vae(data: WorldData, cfg: DictConfig, out: Path, seed: int) -> list[float]:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**plain(cfg.model))
    rng = np.random.default_rng(seed)

    def loss_fn(index):
        # Random crops: the VAE is convolutional (no mid-block attention), so crops train it 4x faster.
        top, left = rng.integers(0, data.images.shape[1] - cfg.crop + 1, 2)
        x = data.pixels(index)[:, :, top : top + cfg.crop, left : left + cfg.crop]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        return F.mse_loss(rec, x) + F.l1_loss(rec, x) + cfg.kl_weight * posterior.kl().mean()

    losses = train_loop("vae", vae, loss_fn, caption_batches(rng, data, cfg), cfg)
    with torch.no_grad():  # unit-variance latents, as Stable Diffusion's scaling factor gives
        sample = vae.encode(data.pixels(rng.integers(0, len(data.captions), 256))).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))
    save_model(vae, out / "pipeline" / "vae")
    return losses


def build_tokenizer(cfg: DictConfig) -> CLIPTokenizer:
    return build_clip_tokenizer(*word_vocab(world_words(list(cfg.extra_words))), model_max_length=cfg.model_max_length)


def train_clip(data: WorldData, cfg: DictConfig, tok_cfg: DictConfig, out: Path, seed: int) -> list[float]:
    torch.manual_seed(seed)
    tok = build_tokenizer(tok_cfg)
    config = CLIPConfig(
        text_config={
            **plain(cfg.text),
            "vocab_size": len(tok),
            "max_position_embeddings": tok.model_max_length,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={**plain(cfg.vision), "image_size": data.images.shape[1]},
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

    losses = train_loop("clip", model, loss_fn, caption_batches(rng, data, cfg), cfg)
    rare = list(tok_cfg.extra_words)
    seen = [w for w in world_words(rare) if w not in rare]
    give_rare_words_typical_embeddings(model.text_model, tok, rare, seen, seed)
    save_model(model, out / "clip", tok)
    # The pipeline's text encoder is the CLIP text tower (as Stable Diffusion's is OpenAI CLIP's).
    save_model(model.text_model, out / "pipeline" / "text_encoder")
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
    model = ViTModel(ViTConfig(**plain(cfg.model), image_size=size), add_pooling_layer=False)
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
    losses = train_loop("dino", model, loss_fn, batches, cfg)
    save_model(model, out / "dino")
    return losses


def train_unet(data: WorldData, cfg: DictConfig, scheduler_cfg: DictConfig, out: Path, seed: int) -> list[float]:
    """Text-to-image on frozen VAE latents and frozen text embeddings; dropped captions teach the
    unconditional prediction that classifier-free guidance needs."""
    torch.manual_seed(seed)
    pipe_dir = out / "pipeline"
    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(pipe_dir / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(pipe_dir / "tokenizer")
    noise_scheduler = DDPMScheduler(**plain(scheduler_cfg))
    unet = UNet2DConditionModel(**plain(cfg.model), cross_attention_dim=text_encoder.config.hidden_size)

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

    losses = train_loop("unet", unet, loss_fn, caption_batches(rng, data, cfg), cfg)
    parts = Components(unet, vae, noise_scheduler, {"text_encoder": text_encoder}, {"tokenizer": tok})
    pipe = get_family("sd").assemble_pipeline(parts)
    save_pipeline_atomically(pipe, pipe_dir)
    return losses
