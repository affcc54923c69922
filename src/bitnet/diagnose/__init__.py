"""Is the BitNet training stack broken, or are the model and the data mismatched?

Every check gives a named result `{"name", "passed", "evidence", "suspected_bug"}`; the problem
names, their part, severity (fatal / harmful / deviation) and fix are one catalogue, problems.py,
shared by every tool.

  the layer     layer_probes.py (the checks), layer_gradients.py (the STE check), reference.py
                (the recipe written out again), watch.py (what the matmul receives): one quantized
                layer as a black box, the same code `python -m bitnet.check_layer` runs
  the model     probes.py: the layer probes over every quantized layer (causes before
                consequences), then whole-model probes
  the run       detectors.py (the eval history, samples, the pipeline checks), health.py
                (QuantHealthTracker, the trainer's on_eval hook), early.py (checks before training
                and the decisive early stops)
  the judgement rules.py (every verdict rule; tasks give thresholds as data), verdict.py
                (make_verdict: OK / BROKEN / INCONCLUSIVE with faults, deviations, evidence),
                report.py (the end-of-run diagnosis, `python -m bitnet.diagnose`), plots.py
  other tools   trained.py + loss_bands.py (check_model), batches.py + data_checks.py + local_hub.py
                (check_data), tokenizer_checks.py (check_tokenizer, check_data, check_model)
  (bitnet/bugs.py holds the self-test's injectable bugs, off the production path; the old name
  bitnet.diagnose.bugs still resolves to it.)
"""
from ..train_signals import TrainingSignals, describe_optimizer  # noqa: F401
from .detectors import (answer_of, detect_format_mismatch, detect_gibberish_samples, detect_init_loss,  # noqa: F401
                        detect_label_shift, detect_loss_stuck, detect_non_finite, detect_non_numeric_answers,
                        detect_not_learning, detect_params_not_updated, detect_prompt_format,
                        detect_repetitive_samples, detect_weight_collapse, format_scores, learning_summary,
                        load_word_list, prompt_token_pairs, run_detectors,
                        words_of)
from .health import QuantHealthTracker, effective_weight, flat_health, health_warnings, summarise_quant_health  # noqa: F401
from .layer_probes import LAYER_CHECKS, layer_problems, probe_layer, result  # noqa: F401
from .reference import reference_activation_quant, reference_weight_quant  # noqa: F401
from .plots import plot_loss_curves, plot_ternary_fractions, read_metrics  # noqa: F401
from .probes import (MODEL_PROBES, PROBE_NAMES, quantized_layers, random_batch, run_layer_probes,  # noqa: F401
                     run_probes)
from .report import diagnose_checkpoint, diagnose_run, find_runs, main, run_history  # noqa: F401
from .verdict import PROBLEMS, compare_twins, format_results, format_verdict, make_verdict, write_verdict  # noqa: F401
