"""Where the seconds of a first HVP on a tiny Hugging Face model go: the graph engine's capture and the rest.

Each model runs in a fresh process (captures are kept per process, so only a fresh one pays for them), one
torch thread. Per model: ``hessgap.hvp`` on one batch (the model's own loss, labels in the batch), then on a
ragged loader of three batches whose batch sizes and sequence lengths all differ. For the first call the
seconds spent in ``torch.export.export``, in ``ExportedProgram.run_decompositions``, in building the graph
programs (the rules' compile step) and in the own-loss check's forward are reported, the rest of the call
being the pass itself (its first kernel uses included). ``captures`` counts exports over both calls.

    python benchmarks/capture_cost.py                        # gpt2 bert t5 vit, CPU seconds
    python benchmarks/capture_cost.py --models gpt2 --clock wall --json out.json

Run it from another checkout (``PYTHONPATH=/path/to/other``) to compare versions: the script needs nothing
that older versions lack (a result without ``capture_seconds`` reports it as missing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict

import torch

import _timing

MODELS = ("gpt2", "bert", "t5", "vit")


def tiny(kind: str) -> torch.nn.Module:
    """A tiny random Hugging Face model with its own loss, float32, eval mode."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    elif kind == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32))
    elif kind == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            pad_token_id=0, decoder_start_token_id=0))
    elif kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
            patch_size=4, num_channels=3, num_labels=5))
    else:
        raise ValueError(kind)
    return model.eval()


def batch(kind: str, rows: int, length: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(rows, 3, 16, 16, generator=gen),
                "labels": torch.randint(0, 5, (rows,), generator=gen)}
    ids = torch.randint(1, 64, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if kind == "t5":
        return {"input_ids": ids, "attention_mask": mask, "labels": labels.flip(1)}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Spent:
    """Seconds spent inside a few functions, by name (the functions wrapped while the object lives)."""

    def __init__(self, clock: _timing.Clock):
        self.clock, self.seconds, self.calls = clock, defaultdict(float), defaultdict(int)

    def wrap(self, owner, attribute: str, name: str) -> None:
        real = getattr(owner, attribute, None)
        if real is None:
            return

        def timed(*args, **kwargs):
            start = self.clock.now()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[name] += self.clock.now() - start
                self.calls[name] += 1

        setattr(owner, attribute, timed)


def one(kind: str, clock_kind: str, k: int) -> dict:
    """Runs in a fresh process: the first HVP on one batch, then on a ragged loader."""
    import hessgap
    from hessgap.curvature.graph import program as graph_program
    from hessgap.curvature.objective import LossOverData

    _timing.set_threads(1)
    clock = _timing.Clock(clock_kind)
    spent = Spent(clock)
    spent.wrap(torch.export, "export", "export")
    spent.wrap(torch.export.ExportedProgram, "run_decompositions", "run_decompositions")
    spent.wrap(graph_program.Program, "__init__", "program")
    spent.wrap(LossOverData, "check_own_loss", "own_loss_check")
    model = tiny(kind)
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(k, n, generator=torch.Generator().manual_seed(0))
    first = batch(kind, 3, 12, seed=1)
    start = clock.now()
    result = hessgap.hvp(model, first, V, return_info=True)
    total = clock.now() - start
    out = {"model": kind, "parameters": n, "path": result.path, "fallback_reason": result.fallback_reason,
           "first_call": total, "capture_seconds": getattr(result, "capture_seconds", None),
           "spent": dict(spent.seconds), "calls": dict(spent.calls)}
    exports = spent.calls["export"]
    start = clock.now()
    hessgap.hvp(model, first, V)
    out["second_call"] = clock.now() - start
    loader = [batch(kind, rows, length, seed) for seed, (rows, length) in enumerate([(4, 10), (2, 7), (3, 13)], 2)]
    start = clock.now()
    ragged = hessgap.hvp(model, loader, V, return_info=True)
    out["ragged_call"] = clock.now() - start
    out["ragged_exports"] = spent.calls["export"] - exports
    out["ragged_notes"] = [note for note in ragged.notes if "captured" in note]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--clock", default="process", choices=sorted(_timing.CLOCKS))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.clock, args.k)))
        return
    rows = []
    for kind in args.models:
        run = subprocess.run([sys.executable, __file__, "--one", kind, "--clock", args.clock, "--k", str(args.k)],
                             capture_output=True, text=True, check=False)
        if run.returncode:
            rows.append({"model": kind, "error": run.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        if "error" in row:
            print(f"{kind}: failed: {row['error']}")
            continue
        parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in row["spent"].items())
        capture = row["capture_seconds"]
        print(f"{kind:5s} {row['path']:7s} first {row['first_call']:.2f} s (capture "
              f"{'n/a' if capture is None else f'{capture:.2f}'}; {parts}), again {row['second_call']:.2f} s, "
              f"ragged loader {row['ragged_call']:.2f} s with {row['ragged_exports']} export(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _timing.machine(), "clock": args.clock, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
