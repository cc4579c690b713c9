"""mi_lenses: lens-style interpretability for TransformerLens models.

Every name is importable from here:

* lenses: :func:`logit_lens`, :func:`tuned_lens`, :class:`LogitLens`, :class:`TunedLens`, :class:`Lens`,
  :func:`run_lens` with its options (:class:`LensOptions`); affine lenses (:class:`AffineLens`, :class:`RowMapLens`)
  and their files (:func:`load_lens`, :func:`save_lens`); tuned-lens training: :func:`train_lens`,
  :class:`TrainConfig`, :func:`evaluate_lens`;
* attribution: :func:`direct_logit_attribution`, :func:`neuron_attribution` (:class:`DLAResult`,
  :class:`NeuronAttribution`);
* attention: :func:`attention` (patterns, sinks, entropy, previous-token and induction scores, q·k terms);
* Patchscopes: :func:`patchscope`, :func:`sweep`, :class:`Source`, :class:`Target`, ``presets``, :func:`fit_map`;
* circuit analysis: :func:`activation_patching` (exact, attribution, EAP-IG), edges, circuits, path patching, their
  options records (:class:`ActivationOptions`, :class:`EdgeOptions`, :class:`PathOptions`);
* the report: :func:`report` (every lens, DLA and attention of one prompt on one offline page);
* models: :func:`load_model`, :class:`ModelView`, the parity probe (:func:`check_parity`, :func:`skip_parity`,
  :func:`parity_report`, :class:`ParityReport`);
* results share one protocol (:class:`Result`: ``show``, ``to_html``, ``print``, ``to_dict``/``to_json``,
  ``to_dataframe``, each type's options declared once in ``view_options``, a one-line ``repr``); errors derive from
  :class:`MiLensesError` and name the fix.

Example:
    >>> res = mi_lenses.logit_lens(model, "The capital of France is", targets=" Paris")   # model = load_model()
    >>> res.labels[-1], float(res.kl_bits[-1].abs().max())    # the final row is the model's own distribution
    ('final', 0.0)
    >>> dla = mi_lenses.direct_logit_attribution(model, "The capital of France is", answer=" Paris")
    >>> abs(float(dla.total[0] - dla.actual[0])) < 1e-3        # the parts sum to the model's logit of ' Paris'
    True
    >>> ps = mi_lenses.patchscope(model, mi_lenses.Source("The capital of France is", layers=-1))
    >>> bool(ps.prec_at_1[0])
    True
"""

from mi_lenses import data, diffusion, patchscopes  # noqa: E402  (subpackages: shipped text, mi_lenses.patchscopes.verify)
from mi_lenses.attn import AttentionResult, QKTerms, attention
from mi_lenses.attribution import DLAResult, NeuronAttribution, direct_logit_attribution, neuron_attribution
from mi_lenses.diffusion import DiffusionLensResult, diffusion_lens
from mi_lenses.errors import LensInputError, MiLensesError, ModelLoadError, VerificationError
from mi_lenses.features import (
    Dictionary,
    DictionaryEvaluation,
    DictionaryEvaluationOptions,
    DictionarySet,
    DictionaryTrainConfig,
    FeatureContexts,
    FeatureContextsOptions,
    FeatureDLA,
    FeatureResult,
    evaluate_dictionary,
    feature_contexts,
    feature_dla,
    features,
    intervene,
    load_dictionary,
    save_dictionary,
    train_dictionary,
)
from mi_lenses.graphs import AttributionGraph, GraphIntervention, attribution_graph
from mi_lenses.lenses import Lens, LensOptions, LensResult, LogitLens, logit_lens, run_lens
from mi_lenses.lenses.affine import AffineLens, RowMapLens, load_lens, save_lens
from mi_lenses.lenses.attribute import (
    AttributeLens,
    RelationEvaluation,
    evaluate_attribute_lens,
    fit_attribute_lens,
)
from mi_lenses.lenses.compare import LensComparison, compare_lenses
from mi_lenses.lenses.future import FutureLens, fit_future_lens
from mi_lenses.lenses.future_prompt import FuturePromptLens, fit_future_prompt
from mi_lenses.lenses.jacobian import JacobianLens, fit_jacobian_lens
from mi_lenses.lenses.tuned import (
    LensEvaluation,
    TrainConfig,
    TunedLens,
    evaluate_lens,
    train_lens,
    tuned_lens,
)
from mi_lenses.models import ModelView, ParityReport, check_parity, load_model, parity_report, skip_parity
from mi_lenses.patchscopes import (
    AffineMap,
    PatchscopeLens,
    PatchscopeResult,
    SelfIEResult,
    Source,
    SweepResult,
    Target,
    fit_map,
    patchscope,
    presets,
    selfie,
    sweep,
)
from mi_lenses.patching import (
    ActivationOptions,
    Circuit,
    EdgeAttribution,
    EdgeOptions,
    PatchingResult,
    PathOptions,
    activation_patching,
    edge_attribution,
    faithfulness,
    path_patching,
)
from mi_lenses.reports import Report, report
from mi_lenses.results import Result

__version__ = "0.1.0"

__all__ = [
    "ActivationOptions",
    "AffineLens",
    "AffineMap",
    "AttentionResult",
    "AttributeLens",
    "AttributionGraph",
    "Circuit",
    "DLAResult",
    "Dictionary",
    "DictionaryEvaluation",
    "DictionaryEvaluationOptions",
    "DictionarySet",
    "DictionaryTrainConfig",
    "DiffusionLensResult",
    "EdgeAttribution",
    "EdgeOptions",
    "FeatureContexts",
    "FeatureContextsOptions",
    "FeatureDLA",
    "FeatureResult",
    "GraphIntervention",
    "FutureLens",
    "FuturePromptLens",
    "JacobianLens",
    "Lens",
    "LensComparison",
    "LensEvaluation",
    "LensInputError",
    "LensOptions",
    "LensResult",
    "LogitLens",
    "MiLensesError",
    "ModelLoadError",
    "ModelView",
    "NeuronAttribution",
    "ParityReport",
    "PatchingResult",
    "PathOptions",
    "PatchscopeLens",
    "PatchscopeResult",
    "QKTerms",
    "RelationEvaluation",
    "Report",
    "Result",
    "RowMapLens",
    "SelfIEResult",
    "Source",
    "SweepResult",
    "Target",
    "TrainConfig",
    "TunedLens",
    "VerificationError",
    "activation_patching",
    "attention",
    "check_parity",
    "compare_lenses",
    "attribution_graph",
    "data",
    "diffusion",
    "diffusion_lens",
    "direct_logit_attribution",
    "edge_attribution",
    "evaluate_attribute_lens",
    "evaluate_dictionary",
    "evaluate_lens",
    "faithfulness",
    "feature_contexts",
    "feature_dla",
    "features",
    "fit_attribute_lens",
    "fit_future_lens",
    "fit_future_prompt",
    "fit_jacobian_lens",
    "fit_map",
    "intervene",
    "load_dictionary",
    "load_lens",
    "load_model",
    "logit_lens",
    "neuron_attribution",
    "parity_report",
    "patchscope",
    "patchscopes",
    "path_patching",
    "presets",
    "report",
    "run_lens",
    "save_dictionary",
    "save_lens",
    "selfie",
    "skip_parity",
    "sweep",
    "train_dictionary",
    "train_lens",
    "tuned_lens",
]
