"""A corpus of malformed inputs, each driven through the real CLI.

Every case must be refused the same way: exit code 2, exactly one line on stderr (``error: ...``) that
names the offending file or key and says what was expected, no traceback, no control characters, and
nothing written: every file under the case's folder (inputs, config, output folder) is byte-identical
afterwards and no new file appears (the output folder is at most an empty folder). Cases that carry a
pickle payload also check that it never ran (its marker file never appears).

Each case is a builder ``(folder) -> (argv, texts the error line must hold)``; a few run as a
subprocess (``python -m medsynth``) to see the real stderr, warnings and all.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from conftest import ROOT, TINY, deep_update
from dicom_factory import write_ct_series, write_rt_struct

from medsynth.cli import main

MARKER = "PICKLE_RAN"  # the file a pickle payload would create
Case = Callable[[Path], tuple[list[str], list[str]]]


# --- inputs ----------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``path``: proof that a loader ran code from a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_checkpoint(path: Path, *, raw: bool = False) -> Path:
    """A .pt file whose payload would create ``MARKER`` beside it: a torch zip archive, or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "medsynth-model", "format_version": 1, "state_dict": Payload(path.parent / MARKER)}
    if raw:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


def scan(seed: int, shape=(20, 20, 8)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    return (np.where(np.sqrt((grid**2).sum(0)) < 0.8, 500.0, 0.0) + rng.normal(0, 5, shape)).clip(0).astype(np.float32)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine), path)
    return path


def header_only(path: Path, shape: tuple[int, ...], *, nifti2: bool = False) -> Path:
    """A NIfTI file whose header claims ``shape`` but holds (almost) no voxels."""
    image = (nib.Nifti2Image if nifti2 else nib.Nifti1Image)(np.zeros((2, 2, 2), np.float32), np.eye(4))
    header = image.header.copy()
    header.set_data_shape(shape)
    blob = header.binaryblock + b"\0" * 4 + b"\0" * 64
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob) if path.name.endswith(".gz") else blob)
    return path


def write_config(folder: Path, extra: dict | None = None) -> Path:
    config = deep_update(deep_update(TINY, {"output_dir": str(folder / "out")}), extra or {})
    path = folder / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def nifti_folder(folder: Path) -> Path:
    """Two good NIfTI scans; each case adds one bad file."""
    data = folder / "data"
    for i in range(2):
        save_nifti(data / f"good_{i}.nii.gz", scan(i))
    return data


def prepare_args(folder: Path, data: Path, **settings) -> list[str]:
    section = {"source": "folder", "folder": str(data), "modality": settings.pop("modality", "mr"), **settings}
    return ["prepare", str(write_config(folder, {"data": section}))]


def dicom_folder(folder: Path) -> Path:
    """One good CT series in its own folder; each case adds a damaged one beside it."""
    data = folder / "data"
    write_ct_series(data / "good", scan(0, (16, 16, 6)) - 1000.0)
    return data


def dicom_prepare_args(folder: Path, data: Path) -> list[str]:
    return prepare_args(folder, data, modality=None, spatial_dims=3, image_size=[16, 16, 8])


def one_series(folder: Path, seed: int = 1, **kwargs) -> list[Path]:
    return write_ct_series(folder, scan(seed, (16, 16, 6)) - 1000.0, **kwargs)


def series_pieces(folder: Path, pieces: list[dict]) -> Path:
    """Slices of ONE SeriesInstanceUID written in pieces (with other sizes / orientations) into one folder."""
    for n, kwargs in enumerate(pieces):
        staging = folder.parent / f".staging{n}"
        shape = kwargs.pop("shape", (16, 16, 3))
        for path in write_ct_series(
            staging, scan(n, shape) - 1000.0, series_uid="1.2.826.0.1.3680043.8.498.1", **kwargs
        ):
            folder.mkdir(parents=True, exist_ok=True)
            path.rename(folder / f"piece{n}_{path.name}")
        staging.rmdir()
    return folder


# --- the corpus: NIfTI in a folder (prepare) ---------------------------------------------------------


def _nifti_case(make_bad: Callable[[Path], Path], expected: str, **settings) -> Case:
    def build(folder: Path) -> tuple[list[str], list[str]]:
        data = nifti_folder(folder)
        bad = make_bad(data)
        return prepare_args(folder, data, **settings), [bad.name, expected]

    return build


def _truncated(name: str, keep: int | None = None) -> Callable[[Path], Path]:
    def make(data: Path) -> Path:
        path = save_nifti(data / name, scan(7))
        blob = path.read_bytes()
        path.write_bytes(blob[: keep if keep is not None else len(blob) // 2])
        return path

    return make


def _write(name: str, blob: bytes) -> Callable[[Path], Path]:
    def make(data: Path) -> Path:
        (data / name).write_bytes(blob)
        return data / name

    return make


def _array(name: str, array: np.ndarray, affine: np.ndarray | None = None) -> Callable[[Path], Path]:
    return lambda data: save_nifti(data / name, array, affine)


def _with_value(value: float) -> np.ndarray:
    array = scan(3)
    array[4, 5, 2] = value
    return array


def _degenerate_affine(data: Path) -> Path:
    image = nib.Nifti1Image(scan(3), np.eye(4))
    image.set_qform(None, code=0)
    image.set_sform(np.diag([0.0, 0.0, 0.0, 1.0]), code=1)  # every voxel at one point
    nib.save(image, data / "degenerate.nii.gz")
    return data / "degenerate.nii.gz"


def _broken_link(data: Path) -> Path:
    (data / "moved_away.nii.gz").symlink_to(data.parent / "elsewhere" / "scan.nii.gz")
    return data / "moved_away.nii.gz"


_RGB = np.zeros((20, 20, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])

NIFTI_CASES = [
    pytest.param(_nifti_case(_truncated("half.nii"), "truncated"), id="nifti-truncated-nii"),
    pytest.param(_nifti_case(_truncated("half.nii.gz"), "truncated"), id="nifti-truncated-nii-gz"),
    pytest.param(_nifti_case(_truncated("stub.nii", keep=200), "NIfTI"), id="nifti-truncated-inside-header"),
    pytest.param(
        _nifti_case(_write("noise.nii.gz", np.random.default_rng(0).bytes(3000)), "corrupt"), id="gzip-corrupt"
    ),
    pytest.param(
        _nifti_case(lambda d: header_only(d / "huge.nii", (32767, 32767, 32767)), "at most"),
        id="nifti1-header-claims-32767-cubed",
    ),
    pytest.param(
        _nifti_case(lambda d: header_only(d / "huge.nii.gz", (100000, 100000, 100000), nifti2=True), "at most"),
        id="nifti2-gz-header-claims-100000-cubed",
    ),
    pytest.param(_nifti_case(_write("empty.nii", b""), "Empty file"), id="nifti-empty-0-bytes"),
    pytest.param(_nifti_case(_write("empty.nii.gz", b""), "Empty file"), id="nifti-gz-empty-0-bytes"),
    pytest.param(_nifti_case(_write("notes.nii", b"subject notes\n" * 40), "corrupt"), id="nifti-name-text-content"),
    pytest.param(
        _nifti_case(_array("dwi.nii.gz", np.zeros((20, 20, 8, 3), np.float32)), "2D or 3D image"), id="nifti-4d"
    ),
    pytest.param(_nifti_case(_array("profile.nii.gz", np.ones(30, np.float32)), "2D or 3D image"), id="nifti-1d"),
    pytest.param(
        _nifti_case(
            _array("slice.nii.gz", np.ones((20, 20), np.float32)),
            "3D volume for spatial_dims 3",
            spatial_dims=3,
            image_size=[16, 16, 8],
        ),
        id="nifti-2d-in-3d-config",
    ),
    pytest.param(
        _nifti_case(lambda d: header_only(d / "hollow.nii", (20, 0, 8)), "empty dimension"), id="nifti-zero-length-axis"
    ),
    pytest.param(_nifti_case(_array("nan.nii.gz", _with_value(np.nan)), "NaN/Inf"), id="nifti-nan-voxel"),
    pytest.param(_nifti_case(_array("inf.nii.gz", _with_value(np.inf)), "NaN/Inf"), id="nifti-inf-voxel"),
    pytest.param(
        _nifti_case(_array("complex.nii.gz", scan(3).astype(np.complex64)), "real-valued"), id="nifti-complex-dtype"
    ),
    pytest.param(_nifti_case(_array("rgb.nii.gz", _RGB), "real-valued"), id="nifti-rgb-dtype"),
    pytest.param(_nifti_case(_degenerate_affine, "affine"), id="nifti-degenerate-affine"),
    pytest.param(_nifti_case(_broken_link, "broken symbolic link"), id="nifti-broken-symlink"),
]


# --- the corpus: DICOM --------------------------------------------------------------------------------


def _dicom_case(make_bad: Callable[[Path], Path], expected: str) -> Case:
    def build(folder: Path) -> tuple[list[str], list[str]]:
        data = dicom_folder(folder)
        bad = make_bad(data)
        return dicom_prepare_args(folder, data), [bad.name, expected]

    return build


def _cut_slice(keep: int | bytes | None) -> Callable[[Path], Path]:
    """Cut one slice short: after ``keep`` bytes, inside the element whose tag bytes are ``keep``, or 100 bytes
    early."""

    def make(data: Path) -> Path:
        path = one_series(data / "damaged")[2]
        blob = path.read_bytes()
        end = keep if isinstance(keep, int) else blob.index(keep) + 3 if isinstance(keep, bytes) else len(blob) - 100
        path.write_bytes(blob[:end])
        return path

    return make


def _edit_slices(edit: Callable[[pydicom.Dataset], None], which: slice = slice(0, 1)) -> Callable[[Path], Path]:
    def make(data: Path) -> Path:
        paths = one_series(data / "damaged")
        for path in paths[which]:
            ds = pydicom.dcmread(path)
            edit(ds)
            ds.save_as(path)
        return paths[which][0] if which != slice(None) else data / "damaged"

    return make


def _junk_dcm(blob: bytes) -> Callable[[Path], Path]:
    def make(data: Path) -> Path:
        one_series(data / "damaged")
        (data / "damaged" / "IM0007.dcm").write_bytes(blob)
        return data / "damaged" / "IM0007.dcm"

    return make


def _huge(ds: pydicom.Dataset) -> None:
    ds.Rows, ds.Columns = 65535, 65535


def _mixed(pieces: list[dict]) -> Callable[[Path], Path]:
    def make(data: Path) -> Path:
        return series_pieces(data / "mixed", pieces)  # the error names a slice in this folder

    return make


def _non_image_only(folder: Path) -> tuple[list[str], list[str]]:
    data = folder / "data"
    write_rt_struct(data / "structures")
    return dicom_prepare_args(folder, data), [str(data), "no NIfTI files or DICOM series"]


DICOM_CASES = [
    pytest.param(_dicom_case(_cut_slice(150), "truncated DICOM file"), id="dicom-truncated-in-file-meta"),
    pytest.param(_dicom_case(_cut_slice(170), "truncated DICOM file"), id="dicom-truncated-in-sop-class-uid"),
    pytest.param(_dicom_case(_cut_slice(b"\x28\x00\x10\x00"), "without Rows/Columns"), id="dicom-truncated-at-rows"),
    pytest.param(_dicom_case(_cut_slice(None), "pixel data"), id="dicom-truncated-pixel-data"),
    pytest.param(
        _dicom_case(_junk_dcm(np.random.default_rng(1).bytes(2000)), "not a DICOM file"),
        id="dicom-random-bytes-dcm-name",
    ),
    pytest.param(_dicom_case(_junk_dcm(b""), "not a DICOM file"), id="dicom-empty-0-bytes"),
    pytest.param(
        _dicom_case(_edit_slices(lambda ds: ds.__delattr__("PixelData")), "no 'Pixel Data'"),
        id="dicom-image-without-pixel-data",
    ),
    pytest.param(_non_image_only, id="dicom-only-a-non-image-object"),
    pytest.param(
        _dicom_case(_mixed([{}, {"shape": (20, 20, 3), "origin": (0.0, 0.0, 200.0)}]), "(Rows, Columns)"),
        id="dicom-one-series-two-sizes",
    ),
    pytest.param(
        _dicom_case(
            _mixed([{}, {"orientation": (0, 1, 0, 0, 0, -1), "origin": (0.0, 0.0, 300.0)}]), "ImageOrientationPatient"
        ),
        id="dicom-one-series-two-orientations",
    ),
    pytest.param(_dicom_case(_edit_slices(_huge, slice(None)), "at most"), id="dicom-rows-columns-65535"),
]


def _denoise_input(make: Callable[[Path], Path], expected: str) -> Case:
    def build(folder: Path) -> tuple[list[str], list[str]]:
        series = make(folder / "scan")
        return ["denoise", str(folder / "scan"), str(folder / "out"), "--method", "tv"], [series.name, expected]

    return build


def _two_series(folder: Path) -> Path:
    one_series(folder, seed=1)
    one_series(folder, seed=2)
    return folder


def _series_and_structures(folder: Path) -> Path:
    one_series(folder)
    return write_rt_struct(folder)


DICOM_CASES += [
    pytest.param(
        _denoise_input(_two_series, "holds 2 DICOM series; expected exactly one"), id="denoise-folder-two-series"
    ),
    pytest.param(
        _denoise_input(_series_and_structures, "non-image DICOM object"), id="denoise-folder-series-plus-rtstruct"
    ),
]


# --- the corpus: configs and overrides ---------------------------------------------------------------


def _yaml(text: str | bytes, expected: list[str], *overrides: str) -> Case:
    def build(folder: Path) -> tuple[list[str], list[str]]:
        path = folder / "config.yaml"
        body = text.replace("OUT", str(folder / "out")) if isinstance(text, str) else text
        path.write_bytes(body.encode() if isinstance(body, str) else body)
        return ["run", str(path), *overrides], [str(path), *expected]

    return build


def _override(*overrides: str, expected: list[str]) -> Case:
    def build(folder: Path) -> tuple[list[str], list[str]]:
        return ["run", str(write_config(folder)), *overrides], expected

    return build


CONFIG_CASES = [
    pytest.param(
        _yaml("output_dir: OUT\ntrain:\n  max_steps: abc\n", ["train.max_steps", "integer"]), id="yaml-string-for-int"
    ),
    pytest.param(
        _yaml("output_dir: OUT\ntrain:\n  lr: [0.1, 0.2]\n", ["train.lr", "number"]), id="yaml-list-for-float"
    ),
    pytest.param(
        _yaml("output_dir: OUT\ntrain:\n  max_steps: true\n", ["train.max_steps", "not a boolean"]),
        id="yaml-bool-for-int",
    ),
    pytest.param(_yaml("output_dir: OUT\ntrain:\n  lr: .inf\n", ["train.lr", "finite"]), id="yaml-inf-for-float"),
    pytest.param(
        _yaml("output_dir: OUT\ndata:\n  phantom:\n    fov_mm: .nan\n", ["data.phantom.fov_mm", "finite"]),
        id="yaml-nan-for-float",
    ),
    pytest.param(
        _yaml("output_dir: OUT\ntrain:\n  epochs: 3\n", ["unknown key 'train.epochs'", "allowed here"]),
        id="yaml-unknown-key",
    ),
    pytest.param(
        _yaml("output_dir: OUT\nmax_steps: 3\n", ["unknown key 'max_steps'", "train"]), id="yaml-key-at-wrong-level"
    ),
    pytest.param(_yaml("output_dir: OUT\ntrain: 5\n", ["key 'train'", "dictionary"]), id="yaml-value-for-a-section"),
    pytest.param(
        _yaml("output_dir: OUT\ndata:\n  phantom: [brain_mri]\n", ["data.phantom", "dictionary"]),
        id="yaml-list-for-a-section",
    ),
    pytest.param(_yaml("output_dir: OUT\ntrain: [1, 2\n", ["malformed YAML", "line"]), id="yaml-syntax-error"),
    pytest.param(_yaml("train:\n\tmax_steps: 3\n", ["malformed YAML", "line 2"]), id="yaml-tab-indent"),
    pytest.param(_yaml("", ["empty config file"]), id="yaml-empty-file"),
    pytest.param(_yaml("# only a comment\n", ["empty config file"]), id="yaml-only-comments"),
    pytest.param(_yaml("- prepare\n- train\n", ["mapping", "list"]), id="yaml-top-level-list"),
    pytest.param(
        _yaml("output_dir: OUT\ntrain:\n  max_steps: 3\ntrain:\n  lr: 0.1\n", ["key 'train' given twice", "line 4"]),
        id="yaml-duplicate-key",
    ),
    pytest.param(_yaml(b"\xff\xfe\x00garbage\x80\x81", ["not a UTF-8 text file"]), id="yaml-not-utf8"),
    pytest.param(
        _yaml(
            "output_dir: !!python/object/apply:os.system ['touch PICKLE_RAN']\n", ["malformed YAML", "python/object"]
        ),
        id="yaml-python-tag-not-executed",
    ),
    pytest.param(
        _override("train.max_steps=abc", expected=["train.max_steps", "integer", "'abc'"]), id="override-string-for-int"
    ),
    pytest.param(_override("train.lr=.inf", expected=["train.lr", "finite"]), id="override-inf"),
    pytest.param(
        _override("train.max_steps", expected=["override 'train.max_steps'", "key.sub=value"]),
        id="override-without-equals",
    ),
    pytest.param(
        _override("train.max_steps.deep=1", expected=["train.max_steps", "not a section"]), id="override-into-a-value"
    ),
    pytest.param(_override("train.epochs=3", expected=["unknown key 'train.epochs'"]), id="override-unknown-key"),
]


# --- the corpus: paths -------------------------------------------------------------------------------


def _datalist(entry: str, expected: str) -> Case:
    """A denoise datalist entry that climbs out of the datalist's folder: refused before any stage runs."""

    def build(folder: Path) -> tuple[list[str], list[str]]:
        lists = folder / "lists"
        lists.mkdir(parents=True)
        (folder / "private").mkdir()
        (folder / "private" / "notes.txt").write_text("not a scan")
        datalist = lists / "datalist.json"
        datalist.write_text(json.dumps({"testing": [{"image": entry}]}))
        config = write_config(
            folder,
            {"stages": ["prepare", "train", "denoise"], "denoise": {"datalist": str(datalist), "methods": ["tv"]}},
        )
        return ["run", str(config)], [str(datalist), "entry 0", expected]

    return build


PATH_CASES = [
    pytest.param(_datalist("../private/notes.txt", "expected a NIfTI file"), id="datalist-dotdot-to-a-non-scan"),
    pytest.param(_datalist("../../../nowhere/scan.nii.gz", "not found"), id="datalist-dotdot-to-nothing"),
]


# --- the corpus: pickles wherever a .pt file is read -------------------------------------------------


def _denoise_checkpoint(raw: bool) -> Case:
    def build(folder: Path) -> tuple[list[str], list[str]]:
        source = save_nifti(folder / "scan.nii.gz", scan(4))
        checkpoint = pickle_checkpoint(folder / "weights" / "model.pt", raw=raw)
        return (
            [
                "denoise",
                str(source),
                str(folder / "denoised.nii.gz"),
                "--checkpoint",
                str(checkpoint),
                "--modality",
                "mr",
            ],
            [str(checkpoint), "pickled Python objects", "refused"],
        )

    return build


def _feature_weights(folder: Path) -> tuple[list[str], list[str]]:
    weights = pickle_checkpoint(folder / "weights" / "resnet10.pt")
    config = write_config(folder, {"evaluate": {"features": {"network": "file", "weights": str(weights)}}})
    return ["run", str(config)], [str(weights), "not a readable weights file"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished prepare stage of the tiny config, copied into the cases that train on it."""
    folder = tmp_path_factory.mktemp("prepared")
    assert main(["prepare", str(write_config(folder))]) == 0
    return folder / "out"


def _with_prepared(build: Case) -> Callable[[Path, Path], tuple[list[str], list[str]]]:
    def with_outputs(folder: Path, prepared: Path) -> tuple[list[str], list[str]]:
        shutil.copytree(prepared, folder / "out")
        return build(folder)

    return with_outputs


def _resume(folder: Path) -> tuple[list[str], list[str]]:
    checkpoint = pickle_checkpoint(folder / "out" / ".train.partial" / "checkpoints" / "last.pt")
    return ["train", str(write_config(folder)), "train.resume=true"], [
        str(checkpoint),
        "pickled Python objects",
        "refused",
    ]


def _perceptual(folder: Path) -> tuple[list[str], list[str]]:
    weights = pickle_checkpoint(folder / "weights" / "medicalnet.pt", raw=True)
    config = write_config(
        folder,
        {
            "diffusion": {"space": "latent"},
            "autoencoder": {
                "channels": [8, 8],
                "norm_num_groups": 8,
                "max_steps": 1,
                "adv_weight": 0.0,
                "perceptual_weight": 0.1,
                "perceptual_weights": str(weights),
            },
        },
    )
    return ["autoencoder", str(config)], [str(weights), "weights file"]


PICKLE_CASES = [
    pytest.param(_denoise_checkpoint(raw=False), id="pickle-torch-zip-as-denoise-checkpoint"),
    pytest.param(_denoise_checkpoint(raw=True), id="pickle-bare-as-denoise-checkpoint"),
    pytest.param(_feature_weights, id="pickle-as-feature-network-weights"),
]
PREPARED_PICKLE_CASES = [
    pytest.param(_resume, id="pickle-as-train-resume-checkpoint"),
    pytest.param(_perceptual, id="pickle-as-autoencoder-perceptual-weights"),
]


# --- the contract ------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under ``folder``."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            state[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_refused(folder: Path, code: int, err: str, expected: list[str], before: dict[str, str]) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got:\n{err}"
    assert "Traceback" not in err and not any(ord(c) < 32 for c in lines[0]), lines[0]
    for text in expected:
        assert text in lines[0], f"{text!r} not in: {lines[0]}"
    assert snapshot(folder) == before, "files were written or changed"
    assert not list(folder.rglob(MARKER)), "a pickle payload ran"


def drive(folder: Path, build: Callable[..., tuple[list[str], list[str]]], capsys, monkeypatch, *args) -> None:
    argv, expected = build(folder, *args)
    monkeypatch.chdir(folder)  # anything written to a relative path would show in the snapshot
    before = snapshot(folder)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    # pytest hides warnings from stderr; a user sees every one not filtered by default (deprecations are).
    shown = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
    ]
    assert_refused(folder, code, "\n".join([capsys.readouterr().err, *shown]), expected, before)


@pytest.mark.parametrize("build", NIFTI_CASES + DICOM_CASES + CONFIG_CASES + PATH_CASES + PICKLE_CASES)
def test_malformed_input_is_refused_in_one_line(build: Case, tmp_path: Path, capsys, monkeypatch) -> None:
    drive(tmp_path, build, capsys, monkeypatch)


@pytest.mark.parametrize("build", PREPARED_PICKLE_CASES)
def test_pickle_payload_beside_prepared_outputs_is_refused(
    build: Case, prepared: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    drive(tmp_path, _with_prepared(build), capsys, monkeypatch, prepared)


# --- the same through a real process: stderr as a user sees it ---------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            _nifti_case(lambda d: header_only(d / "huge.nii.gz", (100000, 100000, 100000), nifti2=True), "at most"),
            id="subprocess-nifti-header-claims-100000-cubed",
        ),
        pytest.param(_denoise_checkpoint(raw=True), id="subprocess-pickle-as-denoise-checkpoint"),
        pytest.param(_yaml("", ["empty config file"]), id="subprocess-yaml-empty-file"),
    ],
)
def test_malformed_input_through_python_dash_m(build: Case, tmp_path: Path) -> None:
    argv, expected = build(tmp_path)
    before = snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # A memory cap: were the header's size trusted, the allocation would fail instead of the check.
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            limit + "import sys; from medsynth.cli import main; sys.exit(main(sys.argv[1:]))",
            *argv,
        ],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_refused(tmp_path, done.returncode, done.stderr, expected, before)


def test_names_from_a_datalist_stay_inside_the_output_folder(tmp_path: Path) -> None:
    """Output names derived from input paths (denoise datalist) are plain names: no separators, no '..'."""
    from medsynth.denoise.files import read_datalist

    outside = tmp_path / "elsewhere"
    save_nifti(outside / "..hidden..nii.gz", scan(1))
    save_nifti(outside / "a b;rm -rf ~.nii.gz", scan(2))
    one_series(outside / "Doe^Jane")
    datalist = tmp_path / "lists" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(
        json.dumps(
            {
                "testing": [
                    "../elsewhere/..hidden..nii.gz",
                    {"image": "../elsewhere/a b;rm -rf ~.nii.gz"},
                    "../elsewhere/Doe^Jane",
                ]
            }
        )
    )
    names = [name for name, _ in read_datalist(datalist, "testing")]
    assert len(set(names)) == 3
    for name in names:
        assert (
            "/" not in name and "\\" not in name and not name.startswith(".") and " " not in name and "Doe" not in name
        ), name
        assert (tmp_path / "out" / name).resolve().parent == (tmp_path / "out").resolve()
