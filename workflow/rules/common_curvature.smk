# Settings, artifact paths and edit registration of the curvature stages (rules: curvature.smk).
from memctl.curvature import settings as curvature_settings

CURV = config["curvature"]


def _model_layer_count():
    """Blocks of the model under study (for sweeps over every layer); None if it cannot be read now."""
    if DEMO:
        return config["demo"]["architecture"]["num_hidden_layers"]
    try:
        from memctl.models import load_config as _hf_config

        return curvature_settings.layer_count(_hf_config(MODEL_REF, config["model"]))
    except Exception:
        return None


try:
    curvature_settings.check(CURV)
    CURV_EDITS = curvature_settings.expand_edits(CURV, _model_layer_count())
except ConfigError as err:
    raise WorkflowError(f"invalid config:\n  {err}")

# Factors depend on the model (and its dtype and device), the calibration text, the data pass and
# the module set.
KFAC_HASH = settings_hash(
    CALIBRATION_HASH, MODEL_KEY, config["model"], CURV["data"], CURV["modules"], config["resources"]["gpu"]
)
KFAC_DIR = f"{MODEL_DIR}/kfac-{KFAC_HASH}"
EIGEN_HASH = settings_hash(KFAC_HASH, "eigh fp64, symmetrized, clamped, descending, sign-fixed")
EIGEN_DIR = f"{KFAC_DIR}/eigen-{EIGEN_HASH}"
SPECTRUM_HASH = settings_hash(EIGEN_HASH, EXTRACT_HASH, CURV["spectrum"])
SPECTRUM = f"{EIGEN_DIR}/spectrum-{SPECTRUM_HASH}/spectrum.parquet"
SVD_UPSTREAM = settings_hash(MODEL_KEY, config["model"])

# edit id -> resolved spec; K-FAC ids chain the eigenbasis hash, SVD ids only the model's.
CURV_SPECS = {}
for _spec in CURV_EDITS:
    _id = curvature_settings.edit_id(_spec, SVD_UPSTREAM if _spec["method"] == "svd" else EIGEN_HASH)
    CURV_SPECS[_id] = _spec
    register_edit(_id, _spec["label"], f"{MODEL_DIR}/edits/{_id}/delta.safetensors")

CURV_SHARDS = CURV["data"]["shards"]
CURV_COLLECT_SETTINGS = {"data": CURV["data"], "modules": CURV["modules"]}
CURV_REPORT = [f"{RESULTS}/curvature.md", f"{RESULTS}/curvature_sweep.png", f"{RESULTS}/curvature_edits.parquet",
               f"{RESULTS}/curvature.html"]
if CURV["spectrum"]["enabled"]:
    CURV_REPORT.append(f"{RESULTS}/curvature_spectrum.png")
CURV_REPORT_OUTPUTS = shown_in_report(CURV_REPORT, "Curvature")
if CURV_SPECS or CURV["spectrum"]["enabled"]:
    EXTRA_OUTPUTS.extend(CURV_REPORT)


def _edit_eigen(wildcards):
    """The eigenbases, for K-FAC edits only: an SVD edit does not wait for (or rerun with) factors."""
    return {} if CURV_SPECS[wildcards.curv_edit]["method"] == "svd" else {"eigen": f"{EIGEN_DIR}/eigen"}
