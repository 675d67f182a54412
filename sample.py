"""
Sample text from a trained run.

    python sample.py --run runs/ra_headsel-tiny-s1337 --prompt "ROMEO:" --tokens 200   # README set-up run, no GPU
"""

import argparse
from pathlib import Path

import torch

from model import GPT, GPTConfig


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder holding ckpt.pt (runs/<run-name>)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per sample")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    ckpt_path = Path(args.run) / "ckpt.pt"
    if not ckpt_path.exists():
        p.error(f"no checkpoint at {ckpt_path}: train first (python train.py ...) and pass its run folder")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(args.device).eval()

    from data.tokenizer import get_tokenizer

    tok = get_tokenizer(ckpt["train_config"]["tokenizer"])
    torch.manual_seed(args.seed)
    idx = torch.tensor([tok.encode(args.prompt)], dtype=torch.long, device=args.device)
    for _ in range(args.samples):
        out = model.generate(idx, args.tokens, temperature=args.temperature, top_k=args.top_k)
        print(tok.decode(out[0].tolist()))
        print("-" * 40)


if __name__ == "__main__":
    main()
