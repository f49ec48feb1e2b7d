"""The report's figures, drawn from :class:`~alflow.report.data.CampaignData` into PNG files.

matplotlib's object API on the Agg canvas: no display, no pyplot state, the caller's backend
untouched. Every axis names its quantity and unit (eV, eV/Å, Å, fs); errors that span decades
are on log scales. Each ``*_figure`` function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from ase import Atoms
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from alflow.constraints import free_mask
from alflow.report.data import CampaignData, Label

DPI = 100
CMAP = "viridis"
ORACLE = dict(marker="*", s=140, color="crimson", edgecolor="black", linewidth=0.6, zorder=5)
CLASS_COLORS = ("#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#9467bd", "#7f7f7f")


def _figure(ncols: int, nrows: int = 1, width: float = 5.6, height: float = 4.0):
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.3")


def _integer_ticks(ax, values: Sequence[int]) -> None:
    values = list(values)
    if values:
        step = max(1, int(np.ceil(len(values) / 12)))
        ax.set_xticks(values[::step])


def _iteration_colors(iterations: Sequence[int]):
    """(norm, colormap) for colouring points by AL iteration, with integer bins."""
    top = max(max(iterations, default=1), 1)
    bounds = np.arange(0.5, top + 1.5)
    return BoundaryNorm(bounds, colormaps[CMAP].N) if len(bounds) > 1 else Normalize(0, 1), colormaps[CMAP]


def _colorbar(fig, ax, norm, cmap, label: str, iterations: Sequence[int]) -> None:
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label)
    top = max(iterations, default=1)
    bar.set_ticks(range(1, top + 1, max(1, int(np.ceil(top / 10)))))


def _log_if_wide(ax, values: Sequence[float | None], axis: str = "y", decades: float = 1.0) -> None:
    """Log scale when the values' magnitudes span more than ``decades`` decades; symmetric log
    (linear near zero) when one is zero or negative, which a log axis would not draw."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    size = np.abs(v[v != 0])
    if not size.size or np.log10(size.max() / size.min()) <= decades:
        return
    scale = ax.set_yscale if axis == "y" else ax.set_xscale
    if (v <= 0).any():
        scale("symlog", linthresh=float(size.min()))
    else:
        scale("log")


def _plotted(ax) -> list[float]:
    """Every y value drawn on ``ax`` (lines, incl. threshold lines)."""
    return [float(v) for line in ax.get_lines() for v in np.atleast_1d(line.get_ydata())]


# ---------------------------------------------------------------------------------------------
# 1. learning curve


def _series(data: CampaignData, key: str) -> tuple[list[int], list[float]]:
    pts = [(it.number, it.metrics.get(key)) for it in data.iterations if it.metrics.get(key) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _threshold(ax, value, label: str, color: str = "black") -> None:
    if value:
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=label)


def learning_curve_figure(data: CampaignData, path: Path) -> Path:
    """Per iteration: oracle calls (cumulative), the model's force and energy errors on the round's
    new labels predicted before retraining (the honest test error), the oracle's stop checks, and
    the largest ensemble uncertainty along the round's ML simulation."""
    fig, axes = _figure(2, 2, width=5.4, height=3.6)
    (ax_calls, ax_force), (ax_energy, ax_unc) = axes
    its = [it.number for it in data.iterations]
    stop = data.spec.get("learner", {}).get("stop", {})
    fig.suptitle(f"{data.name}: learning curve", fontsize=12)

    paid = np.cumsum([it.oracle_calls for it in data.iterations])
    reused = np.cumsum([it.reused for it in data.iterations])
    failed = np.cumsum([it.failed for it in data.iterations])
    ax_calls.plot(its, paid, "o-", label="oracle calls paid")
    if reused.any():
        ax_calls.plot(its, reused, "s--", label="labels reused from the cache")
    if failed.any():
        ax_calls.plot(its, failed, "x:", color="crimson", label="failed oracle calls")
    ax_calls.set(xlabel="AL iteration", ylabel="oracle calls (cumulative)", title="Oracle calls")
    ax_calls.set_ylim(bottom=0)
    ax_calls.yaxis.set_major_locator(MaxNLocator(integer=True))

    x, y = _series(data, "force_mae")
    ax_force.plot(x, y, "o-", label="force MAE on new labels (before retraining)")
    if data.kind == "relax":
        x2, y2 = _series(data, "final_fmax_oracle")
        ax_force.plot(x2, y2, "*-", color="crimson", markersize=9, label="oracle fmax at the ML minimum")
        _threshold(ax_force, stop.get("fmax"), f"fmax criterion {stop.get('fmax')} eV/Å")
    _threshold(ax_force, stop.get("force_mae"), f"force MAE criterion {stop.get('force_mae')} eV/Å")
    ax_force.set(xlabel="AL iteration", ylabel="force error (eV/Å)", title="Force error (test, before retraining)")
    _log_if_wide(ax_force, _plotted(ax_force))

    x, y = _series(data, "energy_mae")
    ax_energy.plot(x, y, "o-", label="energy MAE on new labels (before retraining)")
    if data.kind == "neb":
        for key, marker, label, tol in (("saddle_energy_error", "*-", "|E_ML − E_oracle| at the ML saddle", "energy_tol"),
                                        ("barrier_error", "D-", "|barrier ML − oracle|, same structures", "barrier_tol")):
            x2, y2 = _series(data, key)
            ax_energy.plot(x2, y2, marker, label=label)
            _threshold(ax_energy, stop.get(tol), f"{tol} {stop.get(tol)} eV", color="0.4")
    _threshold(ax_energy, stop.get("energy_mae"), f"energy MAE criterion {stop.get('energy_mae')} eV")
    ax_energy.set(xlabel="AL iteration", ylabel="energy error (eV)", title="Energy error (test, before retraining)")
    _log_if_wide(ax_energy, _plotted(ax_energy))

    x, y = _series(data, "max_uncertainty")
    if x:
        ax_unc.plot(x, y, "o-", color="tab:purple", label="max over the ML simulation")
        if data.spec.get("learner", {}).get("kind") == "online":
            _threshold(ax_unc, data.spec["learner"].get("threshold"), "online threshold")
        _log_if_wide(ax_unc, _plotted(ax_unc))
    else:
        _empty(ax_unc, "no uncertainty recorded along the ML simulations")
    ax_unc.set(xlabel="AL iteration", ylabel="force uncertainty (eV/Å)", title="Ensemble uncertainty along the ML simulation")

    for ax in axes.flat:
        ax.set_xlim(-0.5, max(its, default=1) + 0.5)
        _integer_ticks(ax, its)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7.5, loc="best")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# 2. parity


def _free_components(lab: Label, forces: np.ndarray) -> np.ndarray:
    return np.asarray(forces)[lab.free].ravel()


def _parity_panel(ax, groups, unit: str, quantity: str) -> int:
    """``groups``: [(label, x oracle, y model, colour values or None, style)]. Points of the model
    beyond the frame (errors far larger than the data's range) are drawn at the edge as ▲/▼ and
    counted. Returns the number of such off-scale points."""
    xs = np.concatenate([g[1] for g in groups if len(g[1])] or [np.zeros(0)])
    if not xs.size:
        _empty(ax, f"no {quantity.lower()} with an oracle label and a model prediction")
        return 0
    lo, hi = xs.min(), xs.max()
    ys = np.concatenate([g[2] for g in groups if len(g[2])])
    pad = 0.1 * (hi - lo) if hi > lo else 1.0
    lo, hi = lo - pad, hi + pad
    # include the model points up to 3x the data range, clip farther ones
    span = hi - lo
    ylo, yhi = max(min(ys.min(), lo), lo - span), min(max(ys.max(), hi), hi + span)
    lo, hi = min(lo, ylo), max(hi, yhi)
    off = 0
    for name, x, y, c, style in groups:
        if not len(x):
            continue
        y = np.asarray(y, dtype=float)
        inside = (y >= lo) & (y <= hi)
        mae = float(np.mean(np.abs(np.asarray(x) - y)))
        kwargs = dict(style)
        if c is not None:
            kwargs.update(c=np.asarray(c)[inside], cmap=kwargs.pop("cmap"), norm=kwargs.pop("norm"))
        ax.scatter(np.asarray(x)[inside], y[inside], label=f"{name} (n={len(x)}, MAE {mae:.3g} {unit})", **kwargs)
        for beyond, edge, marker in ((y > hi, hi, "^"), (y < lo, lo, "v")):
            if beyond.any():
                off += int(beyond.sum())
                ax.scatter(np.asarray(x)[beyond], np.full(int(beyond.sum()), edge), marker=marker, s=30,
                           facecolor="none", edgecolor="crimson", linewidth=1, clip_on=False, zorder=6)
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="model = oracle")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set(xlabel=f"oracle {quantity.lower()} ({unit})", ylabel=f"model {quantity.lower()} ({unit})")
    if off:
        ax.text(0.98, 0.02, f"{off} model value(s) off scale, drawn at the edge (△/▽)", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8, color="crimson")
    ax.legend(fontsize=7.5, loc="upper left")
    return off


def parity_figure(data: CampaignData, path: Path) -> Path:
    """Model vs oracle energies and forces (free atoms) for all labels: the final model on its own
    training labels, and each round's model on the labels it queried, predicted before they existed."""
    fig, axes = _figure(2, 1, width=5.4, height=5.0)
    ok = [lab for lab in data.labels if lab.status == "ok" and lab.energy is not None and lab.atoms is not None]
    fitted = [lab for lab in ok if lab.fitted]
    honest = [lab for lab in ok if lab.predicted]
    iterations = [lab.iteration or 0 for lab in honest]
    norm, cmap = _iteration_colors(iterations)
    train_style = dict(marker="o", s=22, facecolor="none", edgecolor="0.35", linewidth=0.8)
    test_style = dict(marker="^", s=34, edgecolor="black", linewidth=0.3, cmap=cmap, norm=norm)
    model_name = (f"final model (round {data.final_model_iteration}) on its training labels"
                  if data.final_model_iteration is not None else "final model on its training labels")
    honest_name = "round's model before the label (test)"
    _parity_panel(axes[0, 0], [
        (model_name, [l.energy for l in fitted], [l.fitted["energy"] for l in fitted], None, train_style),
        (honest_name, [l.energy for l in honest], [l.predicted["energy"] for l in honest], iterations, dict(test_style)),
    ], "eV", "Energy")
    axes[0, 0].set_title("Energy")
    fh = [l for l in honest if l.predicted.get("forces") is not None]
    _parity_panel(axes[0, 1], [
        (model_name, np.concatenate([_free_components(l, l.forces) for l in fitted] or [np.zeros(0)]),
         np.concatenate([_free_components(l, l.fitted["forces"]) for l in fitted] or [np.zeros(0)]), None,
         dict(train_style, s=10)),
        (honest_name, np.concatenate([_free_components(l, l.forces) for l in fh] or [np.zeros(0)]),
         np.concatenate([_free_components(l, l.predicted["forces"]) for l in fh] or [np.zeros(0)]),
         np.concatenate([np.full(3 * int(l.free.sum()), l.iteration or 0) for l in fh] or [np.zeros(0)]),
         dict(test_style, s=14)),
    ], "eV/Å", "Force component")
    axes[0, 1].set_title("Forces (x, y, z components of free atoms)")
    if honest:
        _colorbar(fig, list(axes[0]), norm, cmap, "AL iteration of the test label (▲)", iterations)
    fig.suptitle(f"{data.name}: model vs oracle", fontsize=12)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# 3. uncertainty calibration


def calibration_points(data: CampaignData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted uncertainty, actual max force error over free atoms, iteration) of every newly
    labelled structure with a recorded prediction (eV/Å; both the max over atoms of a per-atom norm)."""
    u, e, it = [], [], []
    for lab in data.labels:
        p = lab.predicted
        if lab.status != "ok" or not p or p.get("uncertainty") is None or p.get("forces") is None:
            continue
        err = np.linalg.norm(p["forces"] - lab.forces, axis=1)[lab.free]
        u.append(p["uncertainty"])
        e.append(err.max() if err.size else 0.0)
        it.append(lab.iteration or 0)
    return np.array(u, dtype=float), np.array(e, dtype=float), np.array(it, dtype=int)


def calibration_figure(data: CampaignData, path: Path) -> Path:
    """Predicted uncertainty vs actual force error on newly labelled structures: how far the
    ensemble's uncertainty can be trusted (points on the diagonal: the uncertainty is the error)."""
    from scipy.stats import spearmanr

    fig, axes = _figure(1, 1, width=6.4, height=5.0)
    ax = axes[0, 0]
    u, e, it = calibration_points(data)
    keep = (u > 0) & (e > 0)
    if keep.sum() == 0:
        _empty(ax, "no newly labelled structure with a recorded prediction\n(seed labels have none; online labels neither)")
    else:
        u, e, it = u[keep], e[keep], it[keep]
        norm, cmap = _iteration_colors(list(it))
        ax.scatter(u, e, c=it, cmap=cmap, norm=norm, s=40, edgecolor="black", linewidth=0.4, zorder=3)
        lo, hi = min(u.min(), e.min()) / 1.5, max(u.max(), e.max()) * 1.5
        ax.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="error = uncertainty")
        ax.fill_between([lo, hi], [lo / 3, hi / 3], [3 * lo, 3 * hi], color="0.5", alpha=0.12,
                        label="within a factor of 3")
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi))
        ax.set_aspect("equal", adjustable="box")
        _colorbar(fig, ax, norm, cmap, "AL iteration of the label", list(it))
        rho = spearmanr(u, e).statistic if len(u) > 2 else float("nan")
        within = float(np.mean((e <= 3 * u) & (e >= u / 3)))
        under = float(np.mean(e > u))
        ax.set_title(f"n = {len(u)}, Spearman ρ = {rho:.2f}, {100 * within:.0f} % within ×3, "
                     f"{100 * under:.0f} % error > uncertainty", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
    ax.set(xlabel="predicted uncertainty: max over free atoms of |σ_F| (eV/Å)",
           ylabel="actual error: max over free atoms of |F_ML − F_oracle| (eV/Å)")
    fig.suptitle(f"{data.name}: uncertainty calibration (new labels, predicted before training)", fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# 4. per kind


def _labels_by_hash(data: CampaignData) -> dict[str, Label]:
    return {lab.structure_hash: lab for lab in data.labels if lab.status == "ok" and lab.energy is not None}


def _frame_hashes(frames: Sequence[Atoms], template: Atoms | None) -> list[str]:
    """Structure hashes of trajectory frames, with the start structure's FixAtoms (extxyz drops them)."""
    from alflow.store.hashing import structure_hash

    out = []
    for f in frames:
        a = f.copy()
        if template is not None and len(template) == len(a) and not a.constraints:
            a.set_constraint([c.copy() for c in template.constraints])
        out.append(structure_hash(a))
    return out


def _fmax(forces: np.ndarray, free: np.ndarray) -> float:
    f = np.asarray(forces)[free]
    return float(np.linalg.norm(f, axis=1).max()) if f.size else 0.0


def _last_trajectory_panels(data: CampaignData, path: Path, what: str):
    """Two panels side by side for the last stored ML trajectory: (fig, (ax_a, ax_b), round,
    frames, start-structure template), or None after saving the figure with both panels saying
    that no ``what`` is stored."""
    fig, axes = _figure(2, 1, width=5.6, height=4.0)
    last = data.last_trajectory()
    if last is None:
        for ax in axes[0]:
            _empty(ax, f"no {what} stored")
        _save(fig, path)
        return None
    template = data.start_structures[0] if data.start_structures else None
    return fig, tuple(axes[0]), last[0], last[1], template


def relax_figure(data: CampaignData, path: Path) -> Path:
    """Energy and fmax along the final ML relaxation, with the frames the oracle labelled."""
    panels = _last_trajectory_panels(data, path, "ML relaxation")
    if panels is None:
        return path
    fig, (ax_e, ax_f), number, frames, template = panels
    free = free_mask(template) if template is not None else np.ones(len(frames[0]), bool)
    steps = np.array([f.info.get("step", i) for i, f in enumerate(frames)])
    energy = np.array([f.get_potential_energy() for f in frames])
    fmax = np.array([_fmax(f.get_forces(apply_constraint=False), free) for f in frames])
    unc = np.array([f.info.get("uncertainty", np.nan) for f in frames], dtype=float)
    e_std = np.array([f.info.get("energy_std", np.nan) for f in frames], dtype=float)
    ax_e.plot(steps, energy, "-", color="tab:blue", label="ML ensemble mean")
    if np.isfinite(e_std).any():
        ax_e.fill_between(steps, energy - e_std, energy + e_std, color="tab:blue", alpha=0.2, label="± ensemble σ_E")
    ax_f.plot(steps, fmax, "-", color="tab:blue", label="ML fmax (free atoms)")
    if np.isfinite(unc).any():
        ax_f.plot(steps, unc, ":", color="tab:purple", label="ensemble uncertainty")
    labels = _labels_by_hash(data)
    hits = [(s, labels[h]) for s, h in zip(steps, _frame_hashes(frames, template)) if h in labels]
    if hits:
        ax_e.scatter([s for s, _ in hits], [l.energy for _, l in hits], label="oracle (labelled frames)", **ORACLE)
        ax_f.scatter([s for s, _ in hits], [_fmax(l.forces, l.free) for _, l in hits],
                     label="oracle fmax (labelled frames)", **ORACLE)
    crit = data.spec.get("learner", {}).get("stop", {}).get("fmax")
    _threshold(ax_f, crit, f"fmax criterion {crit} eV/Å")
    ax_f.set_yscale("log")
    ax_e.set(xlabel="optimizer step", ylabel="energy (eV)", title=f"Final ML relaxation (round {number}): energy")
    ax_f.set(xlabel="optimizer step", ylabel="max force on free atoms (eV/Å)", title="… and fmax")
    for ax in (ax_e, ax_f):
        ax.legend(fontsize=8)
    fig.suptitle(f"{data.name}: relaxation", fontsize=12)
    return _save(fig, path)


def _reaction_coordinate(band: Sequence[Atoms]) -> np.ndarray:
    """Cumulative distance between consecutive images (Å, minimum image convention)."""
    from ase.geometry import find_mic

    d = [0.0]
    for a, b in zip(band[:-1], band[1:]):
        dr, _ = find_mic(b.positions - a.positions, a.cell, a.pbc)
        d.append(d[-1] + float(np.linalg.norm(dr)))
    return np.array(d)


def _saddle_index(energies) -> int:
    """The band's highest-energy interior image (the predicted saddle); any image for a band of two."""
    return 1 + int(np.argmax(energies[1:-1])) if len(energies) > 2 else int(np.argmax(energies))


def band_barriers(data: CampaignData) -> list[tuple[int, float, float | None]]:
    """(iteration, ML barrier, oracle barrier at the same saddle and initial image or None) per round."""
    from alflow.metrics import barrier

    labels = _labels_by_hash(data)
    template = data.start_structures[0] if data.start_structures else None
    out = []
    for it in data.iterations:
        band = it.trajectory
        if not band:
            continue
        energies = [f.get_potential_energy() for f in band]
        hashes = _frame_hashes(band, template)
        first, top = labels.get(hashes[0]), labels.get(hashes[_saddle_index(energies)])
        oracle = it.metrics.get("barrier_oracle")  # recorded by the merge (also for a reused initial state)
        if oracle is None and first is not None and top is not None:
            oracle = top.energy - first.energy
        out.append((it.number, barrier(energies), oracle))
    return out


def neb_figure(data: CampaignData, path: Path) -> Path:
    """The final ML band's energy profile with the oracle at the labelled images, and the barrier
    per iteration (ML vs oracle at the ML saddle and initial state)."""
    panels = _last_trajectory_panels(data, path, "ML band")
    if panels is None:
        return path
    fig, (ax_p, ax_b), number, band, template = panels
    x = _reaction_coordinate(band)
    energy = np.array([f.get_potential_energy() for f in band])
    e_std = np.array([f.info.get("energy_std", np.nan) for f in band], dtype=float)
    ax_p.plot(x, energy - energy[0], "o-", color="tab:blue", label="ML band (relative to its initial image)")
    if np.isfinite(e_std).any():
        ax_p.errorbar(x, energy - energy[0], yerr=e_std, fmt="none", ecolor="tab:blue", alpha=0.5, capsize=3)
    labels = _labels_by_hash(data)
    hits = [(xi, labels[h]) for xi, h in zip(x, _frame_hashes(band, template)) if h in labels]
    first = labels.get(_frame_hashes(band[:1], template)[0])
    recorded = next((it.metrics.get("barrier_oracle") for it in data.iterations if it.number == number), None)
    saddle = labels.get(_frame_hashes(band, template)[_saddle_index(energy)])
    if hits:
        if first is not None:
            ref, what = first.energy, "its initial image"
        elif recorded is not None and saddle is not None:  # the initial state reused a nearby label
            ref, what = saddle.energy - recorded, "the oracle's initial state"
        else:
            ref, what = energy[0], "the ML initial image"
        ax_p.scatter([xi for xi, _ in hits], [l.energy - ref for _, l in hits],
                     label=f"oracle at labelled images (relative to {what})", **ORACLE)
    ax_p.set(xlabel="reaction coordinate (Å)", ylabel="energy relative to the initial state (eV)",
             title=f"Final ML band (round {number})")
    ax_p.legend(fontsize=8)

    rows = band_barriers(data)
    its = [r[0] for r in rows]
    ax_b.plot(its, [r[1] for r in rows], "o-", label="ML barrier of the round's band")
    o = [(r[0], r[2]) for r in rows if r[2] is not None]
    if o:
        ax_b.plot([p[0] for p in o], [p[1] for p in o], "*--", color="crimson", markersize=10,
                  label="oracle at the ML saddle and initial image")
    summary = data.summary or {}
    if summary.get("barrier_oracle") is not None:
        tol = data.spec.get("learner", {}).get("stop", {}).get("barrier_tol")
        if tol:
            ax_b.axhspan(summary["barrier_oracle"] - tol, summary["barrier_oracle"] + tol, color="crimson",
                         alpha=0.1, label=f"final oracle barrier ± barrier_tol ({tol} eV)")
    _log_if_wide(ax_b, [r[1] for r in rows] + [p[1] for p in o])
    ax_b.set(xlabel="AL iteration", ylabel="forward barrier (eV)", title="Barrier per iteration")
    _integer_ticks(ax_b, its)
    ax_b.legend(fontsize=8)
    fig.suptitle(f"{data.name}: NEB", fontsize=12)
    return _save(fig, path)


def rdf(frames: Sequence[Atoms], r_max: float = 6.0, dr: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """All-pair radial distribution function averaged over ``frames``: (r in Å, g(r)), normalised
    with the cell's density (for a slab the cell includes the vacuum, so g(r) → below 1 at large r)."""
    edges = np.arange(0.0, r_max + dr, dr)
    hist = np.zeros(len(edges) - 1)
    volume, n = None, 0
    for atoms in frames:
        d = atoms.get_all_distances(mic=True)
        hist += np.histogram(d[np.triu_indices(len(atoms), 1)], bins=edges)[0]
        volume, n = (atoms.cell.volume or 1.0), len(atoms)
    r = 0.5 * (edges[1:] + edges[:-1])
    if not frames or n < 2:
        return r, hist
    shell = 4.0 * np.pi * r**2 * dr
    density = n / volume
    return r, hist / (len(frames) * 0.5 * n * density * shell)


def md_figure(data: CampaignData, path: Path) -> Path:
    """ML potential energy along each round's MD with the oracle at the labelled frames, and the
    radial distribution function of the last ML trajectory vs the oracle-labelled structures."""
    fig, axes = _figure(2, 1, width=5.6, height=4.0)
    ax_e, ax_g = axes[0]
    dt = float(data.spec.get("simulation", {}).get("timestep_fs", 1.0))
    rounds = [it for it in data.iterations if it.trajectory]
    norm, cmap = _iteration_colors([it.number for it in rounds])
    labels = _labels_by_hash(data)
    template = data.start_structures[0] if data.start_structures else None
    for it in rounds:
        frames = it.trajectory
        t = np.array([f.info.get("step", i) for i, f in enumerate(frames)]) * dt
        e = np.array([f.get_potential_energy() for f in frames])
        color = cmap(norm(it.number))
        ax_e.plot(t, e, "-", color=color, linewidth=0.8)
        hits = [(ti, labels[h]) for ti, h in zip(t, _frame_hashes(frames, template)) if h in labels
                and labels[h].iteration == it.number]
        if hits:
            ax_e.scatter([h[0] for h in hits], [h[1].energy for h in hits], marker="*", s=50, color=color,
                         edgecolor="black", linewidth=0.4, zorder=4)
    if rounds:
        _colorbar(fig, ax_e, norm, cmap, "AL iteration", [it.number for it in rounds])
        ax_e.legend(handles=[Line2D([], [], color="0.3", label="ML potential energy"),
                             Line2D([], [], marker="*", color="0.3", linestyle="", markeredgecolor="black",
                                    markersize=9, label="oracle at the labelled frames")], fontsize=8)
        energies = np.concatenate([[f.get_potential_energy() for f in it.trajectory] for it in rounds])
        lo, hi = np.percentile(energies, [1, 99])
        pad = 0.2 * (hi - lo) + 1e-3
        ax_e.set_ylim(lo - pad, hi + pad)  # first rounds may run far off: keep the bulk in view
    else:
        _empty(ax_e, "no ML trajectory stored")
    ax_e.set(xlabel="time (fs)", ylabel="potential energy (eV)", title="Energy along each round's ML MD")

    last = data.last_trajectory()
    labelled = [lab.atoms for lab in data.labels if lab.status == "ok" and lab.atoms is not None]
    if last is not None:
        frames = last[1][:: max(1, len(last[1]) // 400)]
        r, g = rdf(frames)
        ax_g.plot(r, g, "-", color="tab:blue", label=f"last ML trajectory (round {last[0]}, {len(frames)} frames)")
    if labelled:
        r, g = rdf(labelled)
        ax_g.plot(r, g, "--", color="crimson", label=f"oracle-labelled structures ({len(labelled)})")
    ax_g.set(xlabel="r (Å)", ylabel="g(r), all pairs (cell-normalised)", title="Radial distribution function")
    ax_g.legend(fontsize=8)
    fig.suptitle(f"{data.name}: MD", fontsize=12)
    return _save(fig, path)


KIND_FIGURES: dict[str, tuple[str, Callable[[CampaignData, Path], Path]]] = {
    "relax": ("relaxation.png", relax_figure),
    "neb": ("neb.png", neb_figure),
    "md": ("md.png", md_figure),
}


# ---------------------------------------------------------------------------------------------
# 5. oracle accounting


def failures_per_iteration(data: CampaignData) -> dict[tuple[str, bool], list[int]]:
    """Calls without a label per (class, paid) per iteration, aligned with ``data.iterations``;
    what the iteration records count as failed beyond the classified labels is "unclassified"."""
    index = {it.number: k for k, it in enumerate(data.iterations)}
    out: dict[tuple[str, bool], list[int]] = {}
    for f in sorted(data.failures, key=lambda f: (not f.paid, f.failure_class)):
        counts = out.setdefault((f.failure_class, f.paid), [0] * len(data.iterations))
        if f.iteration in index:
            counts[index[f.iteration]] += 1
    rest = [max(0, it.failed - sum(v[k] for v in out.values())) for k, it in enumerate(data.iterations)]
    if any(rest):
        out[("unclassified", True)] = rest
    return out


def accounting_figure(data: CampaignData, path: Path) -> Path:
    """Oracle calls per iteration (paid and labelled, paid but failed by class, rejected before the
    call, reused from the cache) and the cumulative count against the direct run."""
    fig, axes = _figure(2, 1, width=5.6, height=4.0)
    ax_bar, ax_cum = axes[0]
    its = np.array([it.number for it in data.iterations])
    failed = failures_per_iteration(data)
    paid_failed = np.sum([v for (_, paid), v in failed.items() if paid] or [np.zeros(len(its), int)], axis=0)
    ok = np.array([it.oracle_calls for it in data.iterations]) - paid_failed
    bottom = np.zeros(len(its))
    ax_bar.bar(its, ok, color="tab:green", label="paid, labelled")
    bottom += ok
    for k, ((cls, paid), counts) in enumerate(failed.items()):
        label = f"paid, failed: {cls}" if paid else f"rejected before the call (not paid): {cls}"
        ax_bar.bar(its, counts, bottom=bottom, color=CLASS_COLORS[k % len(CLASS_COLORS)],
                   hatch=None if paid else "xx", edgecolor="white" if paid else "black", label=label)
        bottom += np.array(counts)
    reused = np.array([it.reused for it in data.iterations])
    if reused.any():
        ax_bar.bar(its, reused, bottom=bottom, color="0.85", edgecolor="0.5", hatch="//",
                   label="reused from the label cache (free)")
    ax_bar.set(xlabel="AL iteration", ylabel="oracle calls per iteration", title="Oracle calls per iteration")
    ax_bar.yaxis.set_major_locator(MaxNLocator(integer=True))
    _integer_ticks(ax_bar, list(its))
    ax_bar.legend(fontsize=8)

    paid = np.cumsum([it.oracle_calls for it in data.iterations])
    ax_cum.plot(its, paid, "o-", color="tab:green", label=f"paid (total {int(paid[-1]) if len(paid) else 0})")
    if reused.any():
        ax_cum.plot(its, paid + np.cumsum(reused), "s--", color="0.5", label="paid + reused (labels used)")
    if any(sum(v) for v in failed.values()):
        fails = np.cumsum(np.sum(list(failed.values()), axis=0))
        ax_cum.plot(its, fails, "x:", color="crimson", label=f"failed or rejected (total {int(fails[-1])})")
    direct = data.direct
    if direct.value:
        ax_cum.axhline(direct.value, color="black", linestyle="-" if direct.source == "given" else ":",
                       label=f"direct run: {direct.value} calls" + (" (estimate)" if direct.source == "estimate" else ""))
        if len(paid):
            saved = direct.value - int(paid[-1])
            ax_cum.text(0.02, 0.97, f"saved vs direct: {saved} calls ({100 * saved / direct.value:.0f} %)"
                        + (" — estimate" if direct.source == "estimate" else ""),
                        transform=ax_cum.transAxes, va="top", fontsize=9)
    else:
        ax_cum.text(0.02, 0.97, "direct-run oracle calls: not given", transform=ax_cum.transAxes, va="top", fontsize=9)
    ax_cum.set_ylim(bottom=0, top=max([direct.value or 0] + list(paid + np.cumsum(reused)) + [1]) * 1.15)
    ax_cum.set(xlabel="AL iteration", ylabel="oracle calls (cumulative)", title="Cumulative vs the direct run")
    ax_cum.yaxis.set_major_locator(MaxNLocator(integer=True))
    _integer_ticks(ax_cum, list(its))
    ax_cum.legend(fontsize=8, loc="center right")
    fig.suptitle(f"{data.name}: oracle accounting", fontsize=12)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------


#: (file name, title, caption, function) of every figure, in report order; the per-kind one is added
FIGURES = (
    ("learning_curve.png", "Learning curve",
     "Per AL iteration: oracle calls (cumulative); the model's force and energy errors on the labels added in "
     "that iteration, predicted before retraining (an honest test error), with the oracle's stop checks; and "
     "the largest ensemble force uncertainty along the iteration's ML simulation.", learning_curve_figure),
    ("parity.png", "Model vs oracle",
     "Energies and force components (free atoms): the final model on its own training labels (○), and each "
     "round's model on the structures it queried, predicted before they were labelled (▲, coloured by round).",
     parity_figure),
    ("calibration.png", "Uncertainty calibration",
     "How trustworthy are the uncertainty estimates: the ensemble's predicted force uncertainty against the "
     "actual force error on each newly labelled structure (both eV/Å, max over free atoms).", calibration_figure),
    ("oracle_accounting.png", "Oracle accounting",
     "Oracle calls per iteration: paid and labelled, paid but failed (by failure class), rejected before the "
     "call (not paid), reused from the label cache; and the cumulative count against the direct run's.",
     accounting_figure),
)

KIND_CAPTIONS = {
    "relax": ("Relaxation", "Energy and max force on free atoms along the final ML relaxation, with the oracle's "
                            "values at the frames it labelled."),
    "neb": ("NEB", "The final ML band's energy profile with the oracle at the labelled images; the forward barrier "
                   "per iteration, ML vs the oracle at the ML saddle and initial image."),
    "md": ("MD", "Potential energy along each round's ML MD with the oracle at the frames labelled in that round; "
                 "the radial distribution function of the last ML trajectory vs the oracle-labelled structures."),
}
