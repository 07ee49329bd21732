"""The protocol's report: one markdown file with its tables and matplotlib figures, and results.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.intensity import overlay


@dataclass
class ProtocolResult:
    """What a protocol run gives its report: its settings (``Settings``), the objects' names, the number of training
    pairs and test images, ``results`` (written as results.json), and for the overlay figure the binary masks of the
    first targets per method with those targets (``image``, ``truth``)."""

    s: object
    names: list[str]
    train_pairs: int
    test_images: int
    results: dict
    overlays: dict[str, list] = field(default_factory=dict)
    targets: list = field(default_factory=list)


LOSS_NAMES = {"dice": "Dice", "dicece": "Dice + BCE"}


def optimizer_name(s) -> str:
    """How the report names a run's optimiser: the paper's SGD, or AdamW, with the learning rate where it was set."""
    name = "paper SGD" if s.optimizer == "sgd" else "AdamW"
    return f"{name}, lr {s.lr:g}" if s.lr is not None else name


def _table(
    names: list[str], rows: list[tuple[str, list[float]]], extra: dict[str, list[str]] | None = None, first: str = ""
) -> list[str]:
    """A markdown table: one row per (label, Dice per object), the mean, then ``extra`` columns."""
    extra = extra or {}
    lines = ["| " + " | ".join([first, *names, "mean", *extra]) + " |", "|" + "---|" * (len(names) + 2 + len(extra))]
    for r, (label, dice) in enumerate(rows):
        cells = [label, *[f"{v:.3f}" for v in dice], f"{np.nanmean(dice):.3f}", *[col[r] for col in extra.values()]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(p: ProtocolResult) -> Path:
    """report.md, results.json and the figures into the run's ``Settings.out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, res, names = p.s, p.results, p.names
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "results.json").write_text(json.dumps(res, indent=2))

    def save(fig, name: str) -> str:
        fig.tight_layout()
        fig.savefig(s.out / name, dpi=110)
        plt.close(fig)
        return name

    lines = [
        f"# Protocol report: {s.dataset.name}",
        "",
        f"Dataset `{s.dataset}`: {p.train_pairs} training and {p.test_images} test samples, "
        f"objects {', '.join(names)}. Backbone `{s.backbone}`, preset `{s.preset}`, prompt route `{s.prompt}`. "
        + (
            f"Each PPG model trains {s.steps} episodes ({optimizer_name(s)}, {LOSS_NAMES[s.loss]} loss) with up to "
            f"{s.train_support} supports per episode and {s.views} augmentation views, "
            if s.steps
            else "No training: the PPG runs with its start weights as they are, the training split serves only as "
            "the support pool, "
        )
        + f"from {'weights `' + str(s.ppg_checkpoint) + '`' if s.ppg_checkpoint else f'seed {s.seed}'}. Dice on the "
        f"test split; a target that does not show an object does not count for it. Written by "
        f"`scripts/evaluate_protocol.py`.",
        "",
    ]
    methods = res.get("methods", {})
    rows = {k: m for k, m in methods.items() if "dice" in m}
    if rows:
        lines += _methods_section(p, rows, save, plt)
    if any("draws" in m for m in methods.values()):
        lines += _stability_section(p, {k: m for k, m in methods.items() if "draws" in m}, save, plt)
    if "table2" in res:
        lines += ["## Table 2: CSM / CCM ablation", ""]
        lines += _table(names, list(res["table2"].items())) + [""]
    if "routes" in res:
        lines += [
            "## Prompt routes: where the segmentation comes from",
            "",
            "Each row is a model trained with that route (the last one has nothing to train): P alone in the "
            "decoder's sparse slot as the paper's Eq. 12, the support masks carried over by the Selective map alone "
            "(SAM's mask-prompt slot), both, and those carried masks thresholded with no decoder.",
            "",
        ]
        lines += _table(names, list(res["routes"].items())) + [""]
    if "fig7" in res:
        cells = {tuple(map(int, k.split(","))): v for k, v in res["fig7"].items()}
        ms, gs = sorted({m for m, _ in cells}), sorted({g for _, g in cells})
        lines += [
            f"## Fig. 7: training pairs M x test supports G (mean Dice over {s.draws} support draws, +- std)",
            "",
            "| M \\ G | " + " | ".join(map(str, gs)) + " |",
            "|" + "---|" * (len(gs) + 1),
        ]
        for m in ms:
            vals = [f"{np.mean(cells[m, g]):.3f} +- {np.std(cells[m, g]):.3f}" if (m, g) in cells else "-" for g in gs]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m in ms:
            g_m = [g for g in gs if (m, g) in cells]
            ax.errorbar(g_m, [np.mean(cells[m, g]) for g in g_m], [np.std(cells[m, g]) for g in g_m],
                        marker="o", capsize=3, label=f"M = {m}")  # fmt: skip
        ax.set(xscale="log", xticks=gs, xticklabels=gs, xlabel="test-time supports G", ylabel="mean Dice")
        ax.legend()
        lines += ["", f"![Fig. 7]({save(fig, 'fig7_support_sizes.png')})", ""]
    if "objects" in res:
        ns = sorted(res["objects"], key=int)
        lines += [
            f"## Objects asked at once: mean Dice of the asked objects against N ({s.draws} draws of the labels "
            f"and of {s.test_support} supports, +- std)",
            "",
            "| N | " + " | ".join(ns) + " |",
            "|" + "---|" * (len(ns) + 1),
            "| Dice | "
            + " | ".join(f"{np.mean(res['objects'][n]):.3f} +- {np.std(res['objects'][n]):.3f}" for n in ns)
            + " |",
        ]
        fig, ax = plt.subplots(figsize=(4.5, 3.3))
        ax.errorbar([int(n) for n in ns], [np.mean(res["objects"][n]) for n in ns],
                    [np.std(res["objects"][n]) for n in ns], marker="o", capsize=3)  # fmt: skip
        ax.set(xticks=[int(n) for n in ns], xlabel="objects asked at once N", ylabel="mean Dice", ylim=(0, 1))
        lines += ["", f"![Objects]({save(fig, 'objects_asked.png')})", ""]
    path = s.out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _methods_section(p: ProtocolResult, rows: dict, save, plt) -> list[str]:
    s, res, names = p.s, p.results, p.names
    enc = res.get("encoder_seconds", 0.0)
    lines = [
        f"## Table 1: PPG and its peers ({s.test_support} supports, {p.train_pairs} training pairs)",
        "",
        "Every method uses the same backbone, preprocessing, test targets and metric; the support-based ones get the "
        "same support pairs. *Models trained* counts the models that must be trained to segment all "
        f'{len(names)} objects (the paper\'s "Training times" column).',
        "",
    ]
    lines += _table(
        names,
        [(m["name"], m["dice"]) for m in rows.values()],
        {
            "models trained": [str(m["models_trained"]) for m in rows.values()],
            "the user gives": [m["needs"] for m in rows.values()],
        },
        first="method",
    )
    if "point" not in res.get("prompt_kinds", ["point"]):
        lines += [
            "",
            f"The backbone `{s.backbone}` was trained with box prompts only: a point or a mask prompt alone gives it "
            "an empty mask. The 1-point row shows exactly that; the PerSAM-style and Med-PerSAM-style rows therefore "
            "prompt it with boxes taken from their own location estimates (the region most similar to the support "
            "prototype; the registered support masks), then refine with the predicted mask's box.",
        ]
    lines += [
        "",
        f"### Latency per target (one run, {s.backbone}, this machine)",
        "",
        f"Every method runs the frozen image encoder once per target: {enc:.2f} s. The table adds each method's own "
        "time per target, the time to take a support set (once per support set), and its training.",
        "",
        "| method | own s / target | with encoder | support set s | training s |",
        "|---|---|---|---|---|",
    ]
    for m in rows.values():
        lines.append(
            f"| {m['name']} | {m['seconds']:.3f} | {m['seconds'] + enc:.2f} | {m['setup_seconds']:.2f} | "
            f"{m['train_seconds']:.0f} |"
        )
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * (len(names) + 1), 3.6))
    width = 0.8 / len(rows)
    x = np.arange(len(names) + 1)
    for i, m in enumerate(rows.values()):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [*m["dice"], np.nanmean(m["dice"])], width, label=m["name"])
    ax.set_xticks(x, [*names, "mean"])
    ax.set(ylabel="Dice", ylim=(0, 1), title=f"{s.dataset.name}: Dice per object")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    lines += ["", f"![Dice per object and method]({save(fig, 'table1_methods.png')})", ""]
    keep = min(s.overlays, len(p.targets))
    if keep and p.overlays:
        cols = ["ground truth", *[rows[k]["name"].split(" (")[0] for k in p.overlays if k in rows]]
        fig, axes = plt.subplots(keep, len(cols), figsize=(2.2 * len(cols), 2.3 * keep), squeeze=False)
        for r in range(keep):
            t = p.targets[r]
            panels = [t.truth[0], *[p.overlays[k][r] for k in p.overlays if k in rows]]
            for c, (title, masks) in enumerate(zip(cols, panels, strict=True)):
                axes[r, c].imshow(overlay(t.image, masks))
                axes[r, c].axis("off")
                if r == 0:
                    axes[r, c].set_title(title, fontsize=7)
        lines += [
            f"The first {keep} test targets, every method on the same images (colours: "
            + ", ".join(f"{n} = {c}" for n, c in zip(names, ["red", "blue", "green", "yellow", "purple"], strict=False))
            + "):",
            "",
            f"![Overlays]({save(fig, 'methods_overlays.png')})",
            "",
        ]
    return lines


def _stability_section(p: ProtocolResult, rows: dict, save, plt) -> list[str]:
    s, names = p.s, p.names
    lines = [
        f"## Fig. 4: stability over {s.draws} different support sets ({s.test_support} pairs each)",
        "",
        "Mean Dice over the objects for each support draw; its mean, standard deviation and range over the draws, "
        "and each object's standard deviation. Methods that use no support set vary only with their random prompt "
        "(1-point) or not at all.",
        "",
        "| method | mean | std | range | " + " | ".join(f"std {n}" for n in names) + " |",
        "|" + "---|" * (4 + len(names)),
    ]
    per_draw = {}
    for k, m in rows.items():
        draws = np.array(m["draws"])  # (draws, objects)
        per_draw[k] = np.nanmean(draws, axis=1)
        d = per_draw[k]
        stds = " | ".join(f"{v:.3f}" for v in np.nanstd(draws, axis=0))
        lines.append(f"| {m['name']} | {d.mean():.3f} | {d.std():.3f} | {np.ptp(d):.3f} | {stds} |")
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(rows), 3.6))
    ax.boxplot([per_draw[k] for k in rows])
    ax.set_xticks(range(1, len(rows) + 1), [rows[k]["name"].split(" (")[0] for k in rows], rotation=20, fontsize=8)
    ax.set(ylabel="mean Dice", title=f"Dice over {s.draws} support draws")
    return lines + ["", f"![Fig. 4]({save(fig, 'fig4_stability.png')})", ""]
