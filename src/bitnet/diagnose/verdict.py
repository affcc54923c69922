"""The twin comparison and the verdict: OK / BROKEN / INCONCLUSIVE with the evidence."""
import json
import os

from ..rundir import write_json_atomic
from .problems import PROBLEMS, SEVERITY_ORDER, is_deviation, severity_of
from .rules import _finite, progress_share

def first_step_below(history: list[dict], level: float, key: str = "val_loss") -> int | None:
    return next((h["step"] for h in history if _finite(h.get(key)) and h[key] <= level), None)


def compare_twins(ternary: list[dict], twin: list[dict], milestones: dict[str, float],
                  metric_keys: list[str] = ()) -> tuple[str, dict]:
    """Side by side: final val loss (and task metrics), the gap in nats, and the first evaluated
    step at which each run's val_loss reached each milestone. Returns (printable table, data)."""
    t, f = ternary[-1], twin[-1]
    data = {"ternary_val_loss": t["val_loss"], "twin_val_loss": f["val_loss"],
            "gap_nats": t["val_loss"] - f["val_loss"], "milestones": {}, "metrics": {}}
    rows = [f"{'':34s}{'ternary':>12s}{'fp twin':>12s}",
            f"{'final val loss (step ' + str(t['step']) + ')':34s}{t['val_loss']:12.4f}{f['val_loss']:12.4f}"]
    for key in metric_keys:
        if key in t and key in f:
            data["metrics"][key] = {"ternary": t[key], "twin": f[key]}
            rows.append(f"{key:34s}{t[key]:12.4f}{f[key]:12.4f}")
    for label, level in milestones.items():
        st, sf = first_step_below(ternary, level), first_step_below(twin, level)
        data["milestones"][label] = {"level": level, "ternary_step": st, "twin_step": sf}
        rows.append(f"{'steps to val loss <= ' + label:34s}{str(st if st is not None else '-'):>12s}"
                    f"{str(sf if sf is not None else '-'):>12s}")
    rows.append(f"gap (ternary - twin): {data['gap_nats']:+.4f} nats")
    return "\n".join(rows), data


# ---------------------------------------------------------------------------------------------
# The verdict

NON_FINITE = "non_finite"

# A fault that explains another check's failure: the latter is then not reported as a fault of its
# own (its check stays in failed_checks). A model that sees the answer while teacher-forced scores
# high there and fails to generate; latent weights that decay collapsed, or were initialised, below
# the quantizer's 1e-5 clamp on mean|W| round to zero in any layer, so the layer probes read
# wrong_weight_scale; a layer that never divides its scales out makes the first loss huge as a bad
# init would.
EXPLAINS = {"no_causal_mask": {"train_inference_mismatch"},
            "coupled_weight_decay": {"wrong_weight_scale"}, "init_scale_too_small": {"wrong_weight_scale"},
            "missing_rescale": {"init_scale_too_large"}}
# Symptoms: named only when no other fault is. Parameters that never moved although the optimizer
# holds them had a zero gradient, which an unused module or any fault upstream that stops the
# gradient (a norm rebuilt in forward, weights that round to zero) explains.
SYMPTOMS = {"params_without_gradient"}


def faults_of(failed: list[dict]) -> tuple[list[dict], list[dict]]:
    """(faults, deviations) of the failed checks that name a problem: faults are
    {part, problem, severity, evidence, fix, check}, fatal first; deviations (problems.py's
    harmless conventions) are {part, problem, check, measured}."""
    from .layer_probes import LAYER_CHECKS
    # (check result, problem) for every problem a failed check names: a layer check can name several
    named = [(r, p) for r in failed if r.get("suspected_bug") for p in (r.get("problems") or [r["suspected_bug"]])]
    explained = {e for _, p in named for e in EXPLAINS.get(p, ())}
    if any(p not in SYMPTOMS and not is_deviation(p) for _, p in named):
        explained |= SYMPTOMS
    faults, deviations = {}, {}
    for r, problem in named:
        if problem in explained or problem in faults or problem in deviations:
            continue
        entry = PROBLEMS.get(problem, {"part": "model", "fix": "see the README's problem names"})
        part = "layer" if r["name"] in LAYER_CHECKS else entry["part"]
        finding = r["evidence"].get("finding") or f"{r['name']} failed: {json.dumps(r['evidence'], default=str)[:240]}"
        if is_deviation(problem):
            deviations[problem] = {"part": part, "problem": problem, "check": r["name"], "measured": finding}
        else:
            faults[problem] = {"part": part, "problem": problem, "severity": severity_of(problem),
                               "evidence": finding, "fix": entry["fix"], "check": r["name"]}
    ordered = sorted(faults.values(), key=lambda f: SEVERITY_ORDER[f["severity"]])
    return ordered, list(deviations.values())


def deviations_measured(results: list[dict]) -> list[dict]:
    """Deviations the checks measured while passing or failing (evidence "deviations":
    [{problem, measured}]), one entry per problem."""
    out = {}
    for r in results:
        for d in r["evidence"].get("deviations") or []:
            out.setdefault(d["problem"], {"part": PROBLEMS.get(d["problem"], {}).get("part", "layer"),
                                          "check": r["name"], **d})
    return list(out.values())


def make_verdict(probes: list[dict], ternary_summary: dict, twin_summary: dict | None = None,
                 detectors: list[dict] = (), baseline_loss: float | None = None) -> dict:
    """OK / BROKEN / INCONCLUSIVE, conservatively, in this order:

    1. A fault: a failed probe or detector that names a fatal or harmful problem (problems.py), or
       a failed probe that names none (an unexplained failure)  -> BROKEN; faults =
       [{part, problem, severity, evidence, fix, check}], causes (fatal) first. Not faults:
       - deviations (harmless conventions): listed under "deviations" with their measured size;
       - layer-probe failures that healthy weights clear (probes.run_layer_probes): consequences
         of the trained weights, listed under evidence["consequences"] after the cause;
       - symptoms (params_without_gradient) when another fault is named.
    2. The ternary run counts as learning when learning_summary() says it learns and its
       non_finite detector passed (a run that hit NaN/Inf did not finish).
    3. With a twin (the same config with quant="none", same data order and seed):
         ternary learns (twin or not)               -> OK (a twin that did not learn is a warning)
         twin learns, ternary does not, and the ternary model came less than 30% of the way the
         twin came from the baseline (rules.progress_share; `baseline_loss`, e.g. the bigram
         loss of the targets, else ln V), or hit NaN/Inf -> BROKEN; failed_checks name the ternary's
                                                       failed detectors; no bug can be named
         twin learns, the gap is not decisive       -> INCONCLUSIVE: train longer
         neither learns                             -> INCONCLUSIVE: a data, pipeline or
                                                       hyper-parameter problem, not BitNet's
    4. Without a twin: ternary learns -> OK, otherwise INCONCLUSIVE (nothing separates a broken
       stack from a hard task).
    Detectors that fail on a run judged OK are listed under evidence["warnings"].

    `ternary_summary` and `twin_summary` come from learning_summary(); `probes` from
    run_probes(); `detectors` (the ternary run's) from run_detectors() or the detect_* functions.
    """
    failed_probes = [p for p in probes if not p["passed"]]
    failed_detectors = [d for d in detectors if not d["passed"]]
    consequences = {p["name"]: p["evidence"]["consequence_of_weights"] for p in failed_probes
                    if p["evidence"].get("consequence_of_weights") and not p.get("suspected_bug")}
    non_finite = any(d["name"] == NON_FINITE for d in failed_detectors)
    ternary_learns = bool(ternary_summary.get("learns")) and not non_finite
    twin_learns = None if twin_summary is None else bool(twin_summary.get("learns"))
    evidence = {"probes": {p["name"]: p["passed"] for p in probes},
                "detectors": {d["name"]: d["passed"] for d in detectors},
                "ternary": ternary_summary, "twin": twin_summary, "ternary_learns": ternary_learns,
                "twin_learns": twin_learns}
    failed_checks, suspected, warnings = [], [], []
    faults, deviations = faults_of(failed_probes + failed_detectors)
    deviations += [d for d in deviations_measured(probes) if d["problem"] not in {e["problem"] for e in deviations}]
    unexplained = [p for p in failed_probes if not p.get("suspected_bug") and p["name"] not in consequences]
    if consequences:
        causes = [f["problem"] for f in faults if f["part"] != "layer"] or ["the trained weights' state"]
        evidence["consequences"] = {name: {**c, "of": causes} for name, c in consequences.items()}

    if faults or unexplained:
        verdict = "BROKEN"
        failed_checks = [p["name"] for p in failed_probes] + [d["name"] for d in failed_detectors]
        suspected = [f["problem"] for f in faults]
        if failed_probes:
            evidence["failed_probes"] = {p["name"]: p["evidence"] for p in failed_probes}
        reason = "; ".join([f"{f['part']}: {f['problem']} ({f['severity']})" for f in faults]
                           + [f"probe {p['name']} failed" for p in unexplained])
        if consequences:
            reason += f"; {', '.join(consequences)} fail as a consequence, not a fault of the layer"
    elif ternary_learns:
        verdict = "OK"
        warnings = [d["name"] for d in failed_detectors] + [f"{name} (consequence of the trained weights)"
                                                             for name in consequences]
        if twin_learns is False:
            warnings.append("twin_not_learning")
        reason = "all probes pass and the ternary model learns" + ("" if twin_summary is None else
                                                                  " (twin learns)" if twin_learns else " (twin did not)")
    elif twin_learns:
        progress = progress_share(ternary_summary, twin_summary, baseline_loss)
        evidence["progress"] = progress
        failed_checks = [d["name"] for d in failed_detectors]
        if progress["decisive"] or non_finite:  # a run that blew up where its twin did not is decisive too
            verdict = "BROKEN"
            failed_checks = ["ternary_not_learning_while_twin_learns"] + failed_checks
            reason = ("the full-precision twin learns with the same config and data, the ternary model does not: "
                      + ("it hit NaN/Inf" if non_finite else progress["reason"]))
        else:
            verdict = "INCONCLUSIVE"
            reason = (f"the twin learns and the ternary model does not yet, but the gap is not decisive: "
                      f"{progress['reason']}; train longer")
    else:
        verdict = "INCONCLUSIVE"
        failed_checks = [d["name"] for d in failed_detectors]
        reason = ("neither the ternary model nor its twin learns: a data, pipeline or hyper-parameter problem, not BitNet"
                  if twin_summary is not None else
                  "the ternary model does not learn and there is no twin to tell a broken stack from a hard task")
    if failed_detectors:
        evidence["failed_detectors"] = {d["name"]: d["evidence"] for d in failed_detectors}
    decay = next((d for d in detectors if d["name"] == "weight_decay_collapse" and d["passed"]), None)
    if decay and decay["evidence"].get("coupled_weight_decay"):
        # The configuration is the known fault, but this run's weights have not collapsed (yet): in
        # a short or tiny run large gradients outweigh the L2 term. Named, not judged BROKEN.
        opt = decay["evidence"]["optimizer"]
        warnings.append(f"optimizer: {opt.get('type')} with weight_decay={opt.get('max_weight_decay'):g} adds L2 decay "
                        f"to the gradient (not AdamW's decoupled decay); no collapse of the weights yet in this run, "
                        f"but in longer runs it swamps the gradient: use torch.optim.AdamW")
    evidence["warnings"] = warnings
    evidence["reason"] = reason
    return {"verdict": verdict, "failed_checks": failed_checks, "suspected_bugs": suspected, "faults": faults,
            "deviations": deviations, "evidence": evidence}


def judge_user_data(verdict: dict, probes: list[dict], comparison: dict, checks: list[dict]) -> dict:
    """The verdict of a run on the user's batches (train_bitnet_tiny.py --data), with part "data":
    the problems check_data names on the first batches (their cause), and user_data_trains_worse
    when those batches train clearly worse than ours (rules.compare_data) while every layer probe
    passes (else the layer, not the data, is the suspect). Either makes it BROKEN."""
    faults, deviations = faults_of([c for c in checks if not c["passed"]])
    causes = [f["problem"] for f in faults]
    if comparison.get("worse") and all(p["passed"] for p in probes):
        faults.append({"part": "data", "problem": "user_data_trains_worse", "severity": severity_of("user_data_trains_worse"),
                       "evidence": comparison["finding"] + (f"; check_data names {', '.join(causes)}" if causes else
                                                            "; check_data names no cause"),
                       "fix": PROBLEMS["user_data_trains_worse"]["fix"], "check": "user_data_vs_ours"})
    evidence = {**verdict["evidence"], "data": {"comparison": comparison, "check_data_problems": causes}}
    out = {**verdict, "evidence": evidence, "deviations": verdict["deviations"] + deviations}
    if faults:
        known = {f["problem"] for f in verdict["faults"]}
        new = [f for f in faults if f["problem"] not in known]
        every = sorted(verdict["faults"] + new, key=lambda f: SEVERITY_ORDER[f["severity"]])  # causes first
        out.update(verdict="BROKEN", faults=every, suspected_bugs=[f["problem"] for f in every],
                   failed_checks=verdict["failed_checks"] + [f["check"] for f in new])
        evidence["reason"] = "; ".join(f"{f['part']}: {f['problem']} ({f['severity']})" for f in every)
    return out


def write_verdict(out_dir: str, verdict: dict) -> str:
    """OUT_DIR/verdict.json, written to a temporary file and renamed (never half a file)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "verdict.json")
    write_json_atomic(path, verdict, default=str)
    return path


VERDICT_LINES = {"OK": "INFRASTRUCTURE OK", "BROKEN": "INFRASTRUCTURE BROKEN", "INCONCLUSIVE": "INCONCLUSIVE"}


def format_verdict(verdict: dict) -> str:
    lines = [f"verdict: {VERDICT_LINES[verdict['verdict']]}  ({verdict['evidence']['reason']})"]
    if verdict["failed_checks"]:
        lines.append("  failed checks: " + ", ".join(verdict["failed_checks"]))
    if verdict["suspected_bugs"]:
        lines.append("  suspected bugs: " + ", ".join(verdict["suspected_bugs"]))
    for f in verdict.get("faults", []):
        lines.append(f"  {f['part']}: {f['problem']}: {f['evidence']}; fix: {f['fix']} [{f.get('severity', 'harmful')}]")
    for name, c in verdict["evidence"].get("consequences", {}).items():
        lines.append(f"  consequence, not a fault: {name}: {c['finding']}; caused by {', '.join(c['of'])}")
    for d in verdict.get("deviations", []):
        lines.append(f"  deviation (harmless): {d['problem']}: {d['measured']}")
    if verdict["evidence"].get("warnings"):
        lines.append("  warnings: " + ", ".join(verdict["evidence"]["warnings"]))
    return "\n".join(lines)


def format_results(results: list[dict]) -> str:
    lines = []
    for r in results:
        status = "pass" if r["passed"] else "FAIL" + (f" (suspect {r['suspected_bug']})" if r["suspected_bug"] else
                                                       " (consequence of the trained weights)"
                                                       if r["evidence"].get("consequence_of_weights") else "")
        if r["passed"] and r["evidence"].get("layers_checked") == 0:
            status = "n/a (no BitLinear layers)"
        if r["passed"] and r["evidence"].get("not_applicable"):
            status = f"n/a ({r['evidence']['not_applicable']})"
        lines.append(f"  {r['name']:<24} {status}")
        if not r["passed"]:
            lines.append(f"      {json.dumps(r['evidence'], default=str)[:400]}")
    return "\n".join(lines)
