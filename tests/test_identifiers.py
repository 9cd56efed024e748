"""Patient identifiers never leak: DICOM series carrying distinctive identifiers (in their headers, and
in their folder and file names) go through the whole pipeline, and not one identifier appears in the
MLflow store (params, tags, artifacts, the raw sqlite bytes), in any synthetic or derived file of the
output folder (all bytes, and every DICOM element read back with pydicom), or in stdout / stderr / logs.

The one place real identifiers belong is the denoise stage's derived DICOM series of a real scan: it
is the same patient's scan, denoised, so it keeps that patient's identity (checked separately below).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pydicom
import pytest
import yaml
from conftest import TINY, deep_update
from dicom_factory import write_ct_series
from mlflow import MlflowClient

from medsynth.cli import main

PATIENTS = [
    {
        "PatientName": "Zyxwvut^Qwertina",
        "PatientID": "PID-739184265",
        "PatientBirthDate": "19230417",
        "AccessionNumber": "ACC5550192",
        "InstitutionName": "Plumtree Vale Infirmary",
        "ReferringPhysicianName": "Fennimorex^Oswin",
        "StudyID": "ST88412",
        "OtherPatientIDs": "OPID-26431-X",
    },
    {
        "PatientName": "Grumbleton^Aurelix",
        "PatientID": "PID-602718493",
        "PatientBirthDate": "19311202",
        "AccessionNumber": "ACC5550733",
        "InstitutionName": "Plumtree Vale Infirmary",
        "ReferringPhysicianName": "Fennimorex^Oswin",
        "StudyID": "ST88977",
        "OtherPatientIDs": "OPID-90317-Y",
    },
    {
        "PatientName": "Quorvane^Bellisande",
        "PatientID": "PID-481920376",
        "PatientBirthDate": "19400929",
        "AccessionNumber": "ACC5551846",
        "InstitutionName": "Plumtree Vale Infirmary",
        "ReferringPhysicianName": "Fennimorex^Oswin",
        "StudyID": "ST89150",
        "OtherPatientIDs": "OPID-55102-Z",
    },
]


def _tokens() -> list[str]:
    """Every identifier value, and each name part on its own (file names write 'Zyxwvut_Qwertina')."""
    tokens = set()
    for patient in PATIENTS:
        for value in patient.values():
            tokens.add(value)
            tokens.update(part for part in value.replace("^", " ").split() if len(part) >= 5)
    return sorted(tokens)


TOKENS = _tokens()
PIPELINE = ["prepare", "train", "sample", "denoise", "evaluate", "augment"]


def folder_name(patient: dict) -> str:
    return f"{patient['PatientName'].replace('^', '_')}_{patient['PatientID']}"


def leaks(data: bytes) -> list[str]:
    lowered = data.lower()
    return [t for t in TOKENS if t.lower().encode() in lowered]


def dicom_values(ds: pydicom.Dataset) -> list[str]:
    """Every element's value (and keyword) as text, sequences included."""
    elements = list(ds.iterall()) + (list(ds.file_meta.iterall()) if hasattr(ds, "file_meta") else [])
    return [f"{e.keyword}={e.value}" for e in elements if e.keyword != "PixelData"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The whole pipeline on three identified CT series (built and run once for the module)."""
    root = tmp_path_factory.mktemp("identifiers")
    data = root / "dicom_root"
    rng = np.random.default_rng(0)
    for n, patient in enumerate(PATIENTS):
        hu = (
            rng.normal(0.0, 30.0, (20, 20, 6))
            + np.where(np.hypot(*np.mgrid[-10:10, -10:10]) < 6 + n, 50.0, -950.0)[..., None]
        )
        write_ct_series(
            data / folder_name(patient) / f"CT_{patient['PatientName'].replace('^', '_')}",
            hu,
            identifiers=patient,
            name_prefix=f"{patient['PatientName'].replace('^', '_')}_{patient['AccessionNumber']}_",
        )
    # Your own noisy scan for the denoise stage: one of the identified DICOM series.
    datalist = root / "lists" / "noisy.json"
    datalist.parent.mkdir()
    first = data / folder_name(PATIENTS[0]) / f"CT_{PATIENTS[0]['PatientName'].replace('^', '_')}"
    datalist.write_text(json.dumps({"testing": [{"image": os.path.relpath(first, datalist.parent)}]}))
    config = deep_update(
        TINY,
        {
            "output_dir": str(root / "out"),
            "stages": PIPELINE,
            "tracking": {"experiment": "medsynth-identifiers", "registered_model": "medsynth-identifiers"},
            "data": {
                "source": "folder",
                "folder": str(data),
                "modality": "ct",
                "val_fraction": 0.34,
                "spatial_dims": 2,
                "image_size": [16, 16],
            },
            "augment": {"dicom": True, "audit": {"action": "drop"}},
            "denoise": {"methods": ["tv", "diffusion"], "levels": [0.25], "num_images": 1, "datalist": str(datalist)},
        },
    )
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # every log record of every library, whatever its level
    logging.getLogger().addHandler(handler)
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["run", str(path)])
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(previous)
    return {
        "root": root,
        "out": root / "out",
        "code": code,
        "logs": [r.getMessage() for r in records],
        "data": data,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
    }


def test_pipeline_ran(pipeline_run: dict) -> None:
    assert pipeline_run["code"] == 0, pipeline_run["stderr"]
    out = pipeline_run["out"]
    assert sorted(p.name for p in (out / "augment" / "dicom").iterdir())
    assert (out / "denoise" / "denoise.json").is_file()


def test_no_identifier_in_output_files(pipeline_run: dict) -> None:
    out = pipeline_run["out"]
    derived = out / "denoise" / "scans"  # the same patient's denoised scan: checked below
    found = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file() or derived in path.parents:
            continue
        hits = leaks(path.relative_to(out).as_posix().encode()) + leaks(path.read_bytes())
        if hits:
            found[str(path.relative_to(out))] = hits
    assert not found, f"identifiers in output files: {found}"


def test_no_identifier_in_synthetic_dicom_elements(pipeline_run: dict) -> None:
    files = sorted((pipeline_run["out"] / "augment" / "dicom").rglob("*.dcm"))
    assert files
    for path in files:
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName).startswith("SYNTHETIC") and ds.PatientIdentityRemoved == "YES"
        for text in dicom_values(ds):
            assert not leaks(text.encode()), (path.name, text)


def test_denoised_real_series_stays_with_its_patient(pipeline_run: dict) -> None:
    """A real scan denoised is the same patient's scan: its derived series keeps that patient (by design),
    and its folder and file names are numbered, not copied from the input."""
    derived = pipeline_run["out"] / "denoise" / "scans"
    files = sorted(derived.rglob("*.dcm"))
    assert files
    for path in files:
        assert not leaks(path.relative_to(derived).as_posix().encode()), path
        ds = pydicom.dcmread(path)
        assert ds.PatientID == PATIENTS[0]["PatientID"] and "DERIVED" in list(ds.ImageType)


def _run_artifact_files(client: MlflowClient, run) -> list[Path]:
    location = Path(unquote(urlparse(run.info.artifact_uri).path))
    return sorted(p for p in location.rglob("*") if p.is_file()) if location.is_dir() else []


def test_no_identifier_in_mlflow(pipeline_run: dict) -> None:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("medsynth-identifiers")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(runs) >= len(PIPELINE) + 1
    artifacts = 0
    for run in runs:
        texts = [f"{k}={v}" for k, v in run.data.params.items()] + [f"{k}={v}" for k, v in run.data.tags.items()]
        texts += list(run.data.metrics) + [run.info.run_name or ""]
        for text in texts:
            assert not leaks(text.encode()), (run.info.run_name, text)
        for path in _run_artifact_files(client, run):
            artifacts += 1
            assert not leaks(path.read_bytes()) and not leaks(str(path).encode()), (run.info.run_name, path)
        for dataset in run.inputs.dataset_inputs:
            assert not leaks(f"{dataset.dataset.name} {dataset.dataset.source} {dataset.dataset.profile}".encode()), (
                dataset.dataset.source
            )
    assert artifacts > 0
    for version in client.search_model_versions("name='medsynth-identifiers'"):
        assert not leaks(f"{version.source} {version.tags} {version.description}".encode())
    store = Path(unquote(urlparse(os.environ["MLFLOW_TRACKING_URI"]).path))
    assert store.is_file() and not leaks(store.read_bytes()), "identifiers in the raw mlflow.db"


def test_no_identifier_in_console_or_logs(pipeline_run: dict) -> None:
    assert "prepare: running" in pipeline_run["stdout"] and pipeline_run["logs"] is not None
    assert not leaks(pipeline_run["stdout"].encode()), pipeline_run["stdout"]
    assert not leaks(pipeline_run["stderr"].encode()), pipeline_run["stderr"]
    for message in pipeline_run["logs"]:
        assert not leaks(message.encode()), message
