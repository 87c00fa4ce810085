"""Build the small warmed-up checkpoint that the default `make train` starts from.

    python scripts/make_warm_checkpoint.py --data assets/clips --out assets/warm_checkpoint

    python scripts/make_warm_checkpoint.py --init-from assets/warm_checkpoint --out assets/warm_checkpoint \
        --dit-steps 6000 --seed 1 --threads 1

Uses only the training split (held-out clips stay unseen). Deterministic for a
given seed and thread count on one machine; the first command takes 10 to 18
minutes on 2 CPU cores, the second (which keeps the VAE and continues the DiT,
as `make warm-checkpoint` does) about 6.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from editrl.cluster.config import load_train_config  # noqa: E402
from editrl.policy.model import build_tiny_components, load_components, save_components  # noqa: E402
from editrl.protocol.dataset import PromptDataset  # noqa: E402
from editrl.tools.warmup import WarmupExample, set_latent_statistics, train_dit, train_vae  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="assets/clips", help="dataset directory (prompts_train.parquet)")
    parser.add_argument("--out", default="assets/warm_checkpoint", help="output checkpoint directory")
    parser.add_argument("--config", default="configs/default.yaml", help="train preset giving the policy geometry and sizes")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--dit-steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init-from", default=None,
                        help="continue from this checkpoint directory: its VAE (and latent statistics) are kept and "
                             "--dit-steps more DiT steps are trained from its DiT (use --seed to draw new batches)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_config = load_train_config(ROOT / args.config)
    policy_config = train_config.policy
    dataset = PromptDataset(str(Path(args.data) / "prompts_train.parquet"), policy_config.num_frames, policy_config.height,
                            policy_config.width, fps=train_config.fps)
    examples = [WarmupExample(dataset.clip(row), row.instruction, row.edit_type) for row in dataset.rows if row.checkable]
    corpus = [row.instruction for row in dataset.rows]
    start = time.time()
    if args.init_from:
        components = load_components(args.init_from)
        vae_losses = []
        previous = json.loads((Path(args.init_from) / "warmup_report.json").read_text())
    else:
        components = build_tiny_components(policy_config.tiny, corpus, shift=policy_config.shift, seed=args.seed)
        vae_losses = train_vae(components, examples, args.vae_steps, args.batch_size, lr=2e-3, seed=args.seed)
        set_latent_statistics(components, examples)
        previous = None
    dit_losses = train_dit(components, examples, args.dit_steps, args.batch_size, lr=1e-3, seed=args.seed, max_text_tokens=policy_config.max_text_tokens)
    # the instruction length the checkpoint is used with (PolicyConfig.max_text_tokens None reads it)
    components.tokenizer.model_max_length = policy_config.max_text_tokens
    save_components(components, args.out)
    report = {
        "examples": len(examples),
        "vae_steps": 0 if previous else args.vae_steps,
        "dit_steps": args.dit_steps,
        "vae_loss_first_last": [sum(vae_losses[:20]) / 20, sum(vae_losses[-20:]) / 20] if vae_losses else None,
        "dit_loss_first_last": [sum(dit_losses[:20]) / 20, sum(dit_losses[-20:]) / 20],
        "seconds": time.time() - start,
        "seed": args.seed,
        "continued_from": previous,
    }
    (Path(args.out) / "warmup_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
