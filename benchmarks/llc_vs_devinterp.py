"""The local learning coefficient by hessgap and by devinterp 2 on the same small models, data, settings and
seed: values ± standard errors over chains and wall times, side by side.

devinterp is not a dependency of hessgap; run this with an environment that has both (devinterp 2 samples
language-model data: a Hugging Face ``Dataset`` with ``input_ids`` and a per-token loss)::

    python3 -m venv /tmp/venv-llc && /tmp/venv-llc/bin/pip install torch==2.13.0 devinterp
    PYTHONPATH=. /tmp/venv-llc/bin/python benchmarks/llc_vs_devinterp.py

Models:

- ``regression``: linear regression, d = 10 weights, n = 5000 samples, batches of 250 (λ = d/2 = 5). devinterp
  sees each sample as a two-token "sequence" [i, i] whose one per-token loss is the squared error of sample
  i (its ``loss_fn`` looks the sample up), so both sample the same posterior with the same minibatches.
- ``bigram``: a bigram language model (embedding 12 → 16 tokens), trained, on 512 random 9-token sequences,
  per-token cross-entropy; the same token sequences for both, in batches of 32; nβ = t/log t for the
  t = 4096 tokens predicted.

Both use hessgap's automatic step size and localization for the model (set from λmax and nβ), the same nβ, 4 chains, 200 draws after 100 burn-in
steps. devinterp averages every step including burn-in (its ``llc_mean``); the column "after burn-in"
recomputes devinterp's estimate from its loss trace over the same draws hessgap averages. Standard errors
are the standard deviation over chains divided by √chains (devinterp's ``llc_std`` is the deviation itself).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings

import torch  # before hessgap (the C++ extension links against it)
from torch import nn

import hessgap

warnings.filterwarnings("ignore")


def regression_problem(n=5000, d=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    y = x @ torch.randn(d, generator=generator) + 0.5 * torch.randn(n, generator=generator)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x.double(), y.double()[:, None]).solution.T.float())
    return model, x, y


class Bigram(nn.Module):
    def __init__(self, vocab=16, width=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.out(self.embed(input_ids))


def bigram_problem(sequences=512, length=9, vocab=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    transition = torch.softmax(3 * torch.randn(vocab, vocab, generator=generator), 1)
    ids = torch.zeros(sequences, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (sequences,), generator=generator)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(transition[ids[:, t - 1]], 1, generator=generator).flatten()
    torch.manual_seed(seed)
    model = Bigram(vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        per_token(model, ids).mean().backward()
        optimizer.step()
    return model.eval(), ids


def per_token(model, ids):
    """Next-token cross-entropy per position, (batch, length − 1): devinterp's per-token loss."""
    logits = model(ids)[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="none").reshape(ids.shape[0], -1)


def run_hessgap(model, batches, loss, seed, chains, draws, burn_in, **settings):
    started = time.perf_counter()
    result = hessgap.llc(model, batches, seed=seed, chains=chains, draws=draws, burn_in=burn_in, **loss, **settings)
    return result, time.perf_counter() - started


def run_devinterp(model, ids, loss_fn, settings, seed, chains, draws, burn_in, batch):
    from datasets import Dataset
    from devinterp.slt.llc import llc

    dataset = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        out = llc(model, dataset, {}, lr=settings["step_size"], n_beta=settings["n_beta"],
                  localization=settings["localization"], num_chains=chains, num_draws=draws,
                  num_burnin_steps=burn_in, batch_size=batch, init_seed=seed, loss_fn=loss_fn,
                  output_path=f"{folder}/samples.zarr", device="cpu")
        seconds = time.perf_counter() - started
        per_chain = [float(v) for v in out.llc_per_chain.values]
        trace = torch.tensor(out.loss_trace.values, dtype=torch.float64)  # (chain, step)
        after = (settings["n_beta"] * (trace[:, burn_in:].mean(1) - float(out.init_loss))).tolist()
    return per_chain, after, seconds


def mean_se(values):
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def compare(name, model, batches, loss, ids, loss_fn, batch, expected, args):
    ours, ours_seconds = run_hessgap(model, batches, loss, args.seed, args.chains, args.draws, args.burn_in)
    settings = {"step_size": ours.step_size, "n_beta": ours.n_beta, "localization": ours.localization}
    theirs_all, theirs_after, theirs_seconds = run_devinterp(model, ids, loss_fn, settings, args.seed, args.chains,
                                                             args.draws, args.burn_in, batch)
    rows = [("hessgap", (ours.value, ours.stderr), ours_seconds),
            ("devinterp, every step (its llc_mean)", mean_se(theirs_all), theirs_seconds),
            ("devinterp, after burn-in", mean_se(theirs_after), None)]
    print(f"\n{name}: nβ = {ours.n_beta:.4g}, ε = {ours.step_size:.3g}, γ = {ours.localization:.3g}, "
          f"{args.chains} chains × {args.draws} draws after {args.burn_in} burn-in, batches of {batch}"
          + (f"; known λ = {expected:g}" if expected is not None else ""))
    print(f"| {'':38s} | λ̂ ± SE           | seconds |")
    for label, (value, se), seconds in rows:
        print(f"| {label:38s} | {value:7.3f} ± {se:5.3f} | {seconds:7.1f} |" if seconds is not None else
              f"| {label:38s} | {value:7.3f} ± {se:5.3f} |       – |")
    flagged = [c["check"] for c in ours.diagnostics if not c["ok"]]
    print(f"hessgap diagnostics: {'all passed' if not flagged else 'flagged ' + ', '.join(flagged)}; path {ours.path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="regression,bigram")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--burn-in", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    if "regression" in models:
        model, x, y = regression_problem()

        def squared_error(m, ids):
            index = ids[:, 0]
            return (m(x[index].to(next(m.parameters()).device)).squeeze(-1) - y[index]).square()[:, None]

        batches = [(x[i:i + 250], y[i:i + 250, None]) for i in range(0, len(y), 250)]
        ids = torch.arange(len(y))[:, None].repeat(1, 2)
        compare("linear regression (d = 10, n = 5000)", model, batches, {"loss_fn": nn.functional.mse_loss}, ids,
                squared_error, 250, 5.0, args)
    if "bigram" in models:
        model, ids = bigram_problem()
        batches = [(ids[i:i + 32], ids[i:i + 32]) for i in range(0, len(ids), 32)]
        tokens = ids[:, 1:].numel()  # nβ from the tokens predicted, for both

        def next_token_loss(logits, targets):
            return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))

        compare("bigram language model (16 tokens, 512 sequences of 9)", model, batches,
                {"loss_fn": next_token_loss, "n_beta": tokens / math.log(tokens)}, ids, per_token, 32, None, args)


if __name__ == "__main__":
    main()
