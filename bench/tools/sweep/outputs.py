"""What a study writes next to itself: best.json, trials.csv and the plots."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

from bench.tools.sweep.spec import SweepSpec, override_value


def trials_frame(study, spec: SweepSpec):
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     **{f"param/{p.name}": t.params.get(p.key) for p in spec.params},
                     **{f"seed/{k}": v for k, v in (t.user_attrs.get("value_per_seed") or {}).items()},
                     "epochs_reported": len(t.intermediate_values),
                     "seconds": t.user_attrs.get("seconds"), "retry_of": t.user_attrs.get("retry_of"),
                     "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None})
    return pd.DataFrame(rows)


def write_outputs(study, spec: SweepSpec) -> list[Path]:
    """best.json, trials.csv and the plots, next to the study."""
    from optuna.trial import TrialState

    from bench.core.io import atomic_write_json, atomic_write_text

    folder = spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(study, spec)
    atomic_write_text(folder / "trials.csv", frame.to_csv(index=False))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    states = {s.name.lower(): int((frame["state"] == s.name.lower()).sum()) if len(frame) else 0
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    summary = {"study": spec.study_name, "objective": spec.objective.text, "direction": "maximize",
               "trials": states, "spec": spec.identity}
    if complete:
        best = max(complete, key=lambda t: t.value)
        summary["best"] = {"trial": best.number, "value": best.value, "params": dict(best.params),
                           "value_per_seed": best.user_attrs.get("value_per_seed"),
                           "overrides": [f"{k}={override_value(v)}" for k, v in best.params.items()]}
    atomic_write_json(folder / "best.json", summary)
    return [folder / "best.json", folder / "trials.csv", *write_plots(study, spec, folder)]


def write_plots(study, spec: SweepSpec, folder: Path) -> list[Path]:
    """Optimisation history, intermediate values, parameter importance, slice (and contour with two or more
    parameters) as PNG; a plot the study cannot support yet (too few finished trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    keys = [p.key for p in spec.params]
    plots = {"history": lambda: ovm.plot_optimization_history(study, target_name=spec.objective.metric),
             "intermediate": lambda: ovm.plot_intermediate_values(study),
             "slice": lambda: slice_plot(study, spec)}
    if len(complete) >= 2:
        plots["importance"] = lambda: ovm.plot_param_importances(study, target_name=spec.objective.metric)
    if len(keys) >= 2:
        plots["contour"] = lambda: ovm.plot_contour(study, params=keys, target_name=spec.objective.metric)
    written = []
    for name, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                ax = draw()
            except (ValueError, RuntimeError) as exc:  # e.g. importance with no variation: skip this plot only
                print(f"bench: sweep plot {name} skipped ({exc})", file=sys.stderr)
                continue
        fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).get_figure()
        fig.set_size_inches(max(6.4, 4 * len(keys)) if name in ("slice", "contour") else 6.4, 4.8)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def slice_plot(study, spec: SweepSpec):
    """The objective against each parameter, pruned trials included (Optuna's slice plot leaves them out, and
    with a pruner most trials are pruned): a pruned trial is drawn hollow at its last reported value."""
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    fig, axes = plt.subplots(1, len(spec.params), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], spec.params):
        for state, style in ((TrialState.COMPLETE, dict(color="C0", label="complete")),
                             (TrialState.PRUNED, dict(facecolors="none", edgecolors="C3", label="pruned (last value)"))):
            trials = [t for t in study.get_trials(deepcopy=False, states=(state,)) if t.value is not None]
            ax.scatter([t.params[p.key] for t in trials if p.key in t.params],
                       [t.value for t in trials if p.key in t.params], **style)
        ax.set_xlabel(p.name)
        if p.scale == "log":
            ax.set_xscale("log")
    axes[0][0].set_ylabel(f"val {spec.objective.metric} ({spec.objective.text})")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{spec.study_name}: objective by parameter")
    return axes
