"""The handlers of ``hessgap measures`` and ``hessgap correlate`` (imported when one of them runs)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..experiments import correlate, model_measures
from ..experiments.zoo import preset
from .measures_options import options_from, zoo_from


def cmd_measures(args, folder_for, saved_for, finish) -> int:
    saved = saved_for(args.model_path, args)
    settings = {"model": str(Path(args.model_path).resolve()), "model_sha256": saved.sha256,
                "names": list(args.names) if args.names else None, "invariance": not args.no_invariance,
                "options": options_from(args.sets, args),
                "seed": args.seed, "max_batches": args.max_batches, "eval_batch": args.eval_batch,
                "data_root": args.data_root, "device": args.device}
    with folder_for(args, "measures", settings, f"measures-{saved.label}-{saved.sha256[:8]}") as folder:
        result = model_measures.run(folder, saved, list(args.names) if args.names else None, args.seed, args.data_root,
                                    args.eval_batch, args.max_batches, args.device, not args.no_invariance,
                                    options_from(args.sets, args))
        print(f"model: {saved.describe()}")
        print("\n".join(model_measures.lines(result)))
        finish(folder)
    return 0


def cmd_correlate(args, folder_for, finish) -> int:
    settings = zoo_from(args, preset(args.preset))
    correlate.check_options(settings)
    for dataset in settings.datasets:  # a missing data set fails before any folder is made
        correlate.dataset_of(settings, dataset)
    with folder_for(args, "correlate", settings.to_dict(), f"correlate-{args.preset}", ignore=("device",)) as folder:
        result = correlate.run(folder, settings)
        included = [r for r in result["rows"] if "excluded" not in r]
        print(f"{len(included)} of {len(result['rows'])} networks included")
        for dataset, per in result["correlations"].items():
            print(f"{dataset}: Kendall's τ against the accuracy gap (Ψ: granulated; sign-error over pairs differing in "
                  "one hyperparameter, robust: the worst hyperparameter's)")
            ranked = sorted(per.items(), key=lambda kv: -abs(kv[1].get("tau_acc_gap") or 0))  # an undefined τ last
            for name, e in ranked:
                if "reason" in e:
                    print(f"  {name:24s} n/a: {e['reason']}")
                else:
                    psi = f"{e['granulated']:+.3f}" if e["granulated"] is not None else "  n/a"
                    tau = f"{e['tau_acc_gap']:+.3f}" if e["tau_acc_gap"] is not None else "  n/a"
                    print(f"  {name:24s} τ {tau}  Ψ {psi}  sign-error {_number(e.get('sign_error'))}"
                          f" (robust {_number(e.get('robust_sign_error'))})")
        finish(folder)
    if not included:
        print(f"hessgap: error: no network reached the {settings.min_train_acc:g} % training accuracy the zoo needs; "
              "train longer (--epochs, --lb-epochs) or lower --min-train-acc", file=sys.stderr)
        return 1
    return 0


def _number(value) -> str:
    return f"{value:.3f}" if value is not None else "n/a"
