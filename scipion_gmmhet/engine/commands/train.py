"""Train the heterogeneity network (e2gmm's encoder-decoder on a GMM) on aligned particles.

Each particle is encoded from the gradient of its similarity with the neutral GMM's projection
(at its pose, with its CTF; --loss: the band correlation by default, e2gmm's ring FRC with
--loss frc) into a point of a small latent space; the decoder turns
latent points into changed GMMs. Writes OUT/latent.npy (float32, one row per particle in star
order; with --symmetry, n_particles x n_ops rows, particle-major), OUT/model.pt, OUT/loss.csv
(epoch, train_loss, val_loss, seconds), OUT/config.json, OUT/gmm.npz and OUT/checkpoints/.
With --finer-model auto and a reconstruction finer than the GMM, OUT/first_model holds a first
training on the given GMM and OUT the second, on a finer GMM of the motion-corrected map, its
network started from the first (engine/training/finer_model.py, warm_start.py).

Examples:
  gmmhet train --particles particles.star --gmm build/ --zdim 4 --epochs 30 --out train/
  gmmhet train --particles particles.star --gmm build/gmm.npz --zdim 2 --epochs 40 \\
      --changes amplitudes --batch-size 128 --device cuda --out train_amp/
  gmmhet train --particles spike.star --gmm build/ --symmetry C3 --mask one_rbd.mrc \\
      --changes positions --out train_rbd/
  gmmhet train --particles particles.star --gmm build/ --epochs 60 --resume --out train/
  torchrun --nproc_per_node 4 -m scipion_gmmhet.engine train --particles particles.star \\
      --gmm build/ --device cuda --out train/     # one process per GPU (DistributedDataParallel)
  gmmhet train --particles particles.star --gmm build/ --device cuda --batch-size 512 \\
      --amp bf16 --compile --out train_fast/     # GPU path: mixed precision + torch.compile

A NaN/Inf pixel is refused before training (a sample of the images, then every batch). On
CUDA out-of-memory the batch is processed in halved chunks (same result up to rounding): the
physical chunk starts at --batch-size and halves until it fits, so a large --batch-size fills
the GPU. The next batches' images are read on a background thread (pinned memory on CUDA);
--no-prefetch turns that off (results are identical either way). On CUDA the epoch reads blocks
of consecutive particles (random block order) on --loader-threads threads into reused pinned
buffers, the gradient features are computed in batches of 1,024 and kept on the GPU when they
fit, and without --batch-size a short probe picks the batch size.
"""
from __future__ import annotations

import argparse

from ..ctf_modes import CTF_CHOICES, ctf_mode as ctf_mode_name
from ..errors import InputError


def add_args(p: argparse.ArgumentParser) -> None:
    from ..training.config import FINER_MODELS, TrainConfig
    from ..training.latent_posterior import LATENT_ESTIMATES
    d = TrainConfig()
    p.add_argument("--particles", required=True, help="RELION particle star file with 3D alignment and CTF")
    p.add_argument("--gmm", required=True, help="neutral GMM: 'gmmhet build' output folder or its gmm.npz")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--zdim", type=int, default=d.zdim, help=f"latent dimension (default {d.zdim})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="particles per step (default 0 = automatic: 64 on the CPU; on one GPU a short "
                        "memory/throughput probe, with the learning rate scaled by batch / 64)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"Adam learning rate (default {d.lr:g}; with the automatic batch size, the rate at batch 64)")
    p.add_argument("--changes", default=",".join(d.changes),
                   help="what may change: comma-separated subset of positions,amplitudes,widths "
                        "(default positions,amplitudes)")
    p.add_argument("--mask", default=None, help="focus mask (MRC): only Gaussians whose centre is inside "
                                                "(> 0.5) may change")
    p.add_argument("--symmetry", default="C1", help="C or D point group for symmetry expansion, e.g. C3, D2 "
                                                    "(use with a mask on one asymmetric unit)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (initialisation, order, noise) (default {d.seed})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    p.add_argument("--features", choices=["cache", "onthefly"], default=d.features,
                   help="gradient features cached once in OUT/features.f16 (default) or computed every batch")
    p.add_argument("--ctf", dest="ctf_mode", choices=CTF_CHOICES, default="auto",
                   help="how the images carry the CTF: full (raw images), phase_flipped, premultiplied, or "
                        "none; auto reads the star (ctf and flipped: old names of full and phase_flipped)")
    p.add_argument("--lowres", type=float, default=d.lowres_A, help="low-resolution limit of the training band (the similarity's Fourier band), A (default 100)")
    p.add_argument("--highres", type=float, default=None,
                   help="band high-resolution limit, A (default: the neutral GMM's resolution, or coarser where "
                        "the particles carry no signal: last ring where the mean FRC of 512 particles with the "
                        "neutral model is 3 standard errors above 0; --loss frc: last ring where one "
                        "particle's FRC is >= min(0.5, 0.6 x its peak))")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out fraction (default 0.05)")
    p.add_argument("--latent-noise", type=float, default=d.latent_noise, help=f"latent noise sd during training with --prior l2 (default {d.latent_noise})")
    p.add_argument("--latent-reg", type=float, default=d.latent_reg, help=f"weight of the latent-norm penalty with --prior l2 (default {d.latent_reg})")
    p.add_argument("--loss", choices=["corr", "frc"], default=d.loss,
                   help="similarity of projection and particle: corr (one correlation over all Fourier "
                        "coefficients of the band: the white-noise likelihood) or frc (e2gmm's ring-averaged "
                        f"FRC) (default {d.loss})")
    p.add_argument("--prior", choices=["kl", "l2"], default=d.prior,
                   help="latent prior: kl (variational, KL to N(0, I): unused latent dimensions collapse) or l2 "
                        f"(e2gmm's fixed noise --latent-noise and penalty --latent-reg) (default {d.prior})")
    p.add_argument("--kl-weight", type=float, default=d.kl_weight,
                   help=f"weight of the KL term (nats) against the similarity, --prior kl (default {d.kl_weight:g})")
    p.add_argument("--center", choices=["auto", "off"], default=d.center,
                   help="auto: before training, check each particle's shift against the neutral GMM's "
                        "projection (shift-only local search, up to 3 px; a shift moves only when the image "
                        "says so, and the corrections are kept only when the half maps agree better with "
                        "them) and train with the corrections, so that shift errors of the input poses do "
                        "not become the latent space; the star is not changed and the corrections are "
                        "written to centering.csv; off: the star's shifts as they are (default auto)")
    p.add_argument("--latent-estimate", choices=LATENT_ESTIMATES, default=d.latent_estimate,
                   help="posterior: after training, each particle's latent is the mean over a few dozen decoded "
                        "latent states weighted by how well each explains its image (the likelihood; ranks the "
                        "particles closer to what the data allow); encoder: the encoder's output "
                        f"(default {d.latent_estimate})")
    p.add_argument("--finer-model", choices=FINER_MODELS, default=d.finer_model,
                   help="auto: when the particles' reconstruction at their poses is finer than 0.8 x the neutral "
                        "GMM's build resolution, train first on the given GMM (OUT/first_model), then build a GMM "
                        "of the motion-corrected reconstruction (each particle's decoded motion undone) at the "
                        "map's resolution and train a second network on it into OUT, started from the first, the KL "
                        "weight scaled to the wider band: "
                        "the band then reaches finer detail (3-5x the training time; it warns when the second "
                        "latent space has fewer directions carrying signal than the first); off: train once on "
                        "the given GMM "
                        f"(default {d.finer_model})")
    p.add_argument("--hidden", type=int, default=d.hidden, help="units per hidden layer (default 512)")
    p.add_argument("--layers", type=int, default=d.layers, help="hidden layers per network (default 3)")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default=d.amp,
                   help="mixed precision of the encoder/decoder networks (projection, FRC and loss stay "
                        "float32): bf16 (CPU or recent GPUs), fp16 (CUDA only, with loss scaling) or off "
                        "(default)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder/decoder networks (falls back to eager mode with a warning "
                        "when compilation fails)")
    p.add_argument("--proj-precision", choices=["fp32", "bf16", "fp16"], default=d.proj_precision,
                   help="precision of the projection's matrix product (positions, phases and accumulation stay "
                        "float32; fp16 is scaled so it cannot overflow; default fp32)")
    p.add_argument("--loader-threads", type=int, default=d.loader_threads,
                   help=f"reader threads of the GPU data path (block-shuffled contiguous reads into pinned "
                        f"buffers; default {d.loader_threads}); the CPU uses one prefetch thread")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help=f"log the running loss every N steps (default {d.log_every}; the only host "
                        "synchronisation inside an epoch; 0: once per epoch)")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="read each batch's images when it is needed instead of on a background thread "
                        "two batches ahead (same results)")


def main(args) -> int:
    from ..training.distributed import init_from_env
    from ..io.atomic import make_output_dir
    from ..io.data import Particles
    from ..training.features import focus_mask_gaussians
    from ..model.networks import parse_changes
    from ..device import resolve_device
    from ..training.config import TrainConfig, load_gmm
    from ..training.finer_model import train_model
    if args.zdim < 1:
        raise InputError(f"--zdim {args.zdim}: the latent dimension must be at least 1")
    if not 0 <= args.val_fraction < 0.5:
        raise InputError(f"--val-fraction {args.val_fraction}: give a fraction in [0, 0.5)")
    args.ctf_mode = ctf_mode_name(args.ctf_mode, "--ctf")
    cfg = TrainConfig(zdim=args.zdim, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      changes=parse_changes(args.changes), seed=args.seed, features=args.features,
                      ctf_mode=args.ctf_mode, symmetry=args.symmetry, mask=args.mask, lowres_A=args.lowres,
                      highres_A=args.highres, val_fraction=args.val_fraction, latent_noise=args.latent_noise,
                      latent_reg=args.latent_reg, hidden=args.hidden, layers=args.layers,
                      amp=args.amp, compile=args.compile, prefetch=args.prefetch,
                      proj_precision=args.proj_precision, loader_threads=args.loader_threads,
                      log_every=args.log_every, loss=args.loss, prior=args.prior, kl_weight=args.kl_weight,
                      center=args.center, latent_estimate=args.latent_estimate, finer_model=args.finer_model)
    resolve_device(args.device)  # a clear error before joining a process group
    dist = init_from_env(args.device)  # torchrun: one process per GPU (see engine/training/distributed.py)
    try:
        neutral = load_gmm(args.gmm)
        if args.mask:  # grid and selection checked before the particles are read (engine/io/validate.py)
            focus_mask_gaussians(neutral, args.mask)
        first = [Particles.from_star(args.particles, symmetry=args.symmetry, ctf_mode=args.ctf_mode,
                                     device=dist.device)]  # read now: a bad star fails before OUT is made

        def particles():  # each training corrects and crops its particles in place: a fresh copy after the first
            return first.pop() if first else Particles.from_star(args.particles, symmetry=args.symmetry,
                                                                 ctf_mode=args.ctf_mode, device=dist.device)
        make_output_dir(args.out)
        train_model(particles, neutral, cfg, args.out, resume=args.resume, star_path=args.particles, dist=dist,
                    device=dist.device)
    finally:
        dist.close()
    return 0
