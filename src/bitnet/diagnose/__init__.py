"""Is the BitNet training stack broken, or are the model and the data mismatched?

Four kinds of evidence, each a named result `{"name", "passed", "evidence", "suspected_bug"}`
(`suspected_bug` is a problem name, defined in the README):

  probes.py, layer_probes.py, watch.py
              check a model instance directly, no training: every quantized layer is driven as a
              black box through forward/backward and compared with the b1.58 recipe (the same
              code `python -m bitnet.check_layer` runs on one layer), then whole-model probes.
  detectors.py
              pure functions on a run's evaluation history and generated samples, and the
              pipeline checks (issue 11: optimizer, data format, initialisation).
  health.py   QuantHealthTracker, the trainer's `on_eval` hook for per-layer quantization health.
  verdict.py  make_verdict() combines probes, the ternary run, its full-precision twin and the
              detectors into OK / BROKEN / INCONCLUSIVE with the evidence.
  (bitnet/bugs.py holds the self-test's injectable bugs, off the production path; the old name
  bitnet.diagnose.bugs still resolves to it.)
  plots.py, report.py
              pictures, the end-of-run diagnosis, and `python -m bitnet.diagnose --checkpoint OUT_DIR`.
"""
from ..train_signals import TrainingSignals, describe_optimizer  # noqa: F401
from .detectors import (answer_of, detect_format_mismatch, detect_gibberish_samples, detect_init_loss,  # noqa: F401
                        detect_label_shift, detect_loss_stuck, detect_non_finite, detect_non_numeric_answers,
                        detect_not_learning, detect_params_not_updated, detect_prompt_format,
                        detect_repetitive_samples, detect_weight_collapse, format_scores, learning_summary,
                        load_word_list, prompt_token_pairs, run_detectors,
                        words_of)
from .health import QuantHealthTracker, effective_weight, flat_health, health_warnings, summarise_quant_health  # noqa: F401
from .layer_probes import (LAYER_CHECKS, layer_problems, probe_layer, reference_activation_quant,  # noqa: F401
                           reference_weight_quant, result)
from .plots import plot_loss_curves, plot_ternary_fractions, read_metrics  # noqa: F401
from .probes import (MODEL_PROBES, PROBE_NAMES, quantized_layers, random_batch, run_layer_probes,  # noqa: F401
                     run_probes)
from .report import diagnose_checkpoint, diagnose_run, find_runs, main, run_history  # noqa: F401
from .verdict import PROBLEMS, compare_twins, format_results, format_verdict, make_verdict, write_verdict  # noqa: F401
