"""Model and data sources named on the command line: every kind, and the bad inputs."""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import torch
from tests._helpers import Exploit, save_photo, write_bert_folder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quantaware.image_folder import ImageFolder, ImageFolderError
from quantaware.models import DigitsCNN
from quantaware.sources import (
    DataSource,
    LoadedModel,
    SourceError,
    load_data,
    load_model,
    load_weights,
    read_labels,
)
from quantaware.zoo.minilm import MiniLM

PIL = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")
onnx = pytest.importorskip("onnx")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("single_thread")

USER_MODEL = """\
import torch
from torch import nn

from user_model_blocks import head


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = head(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def build():
    return Net()
"""

USER_BLOCKS = """\
from torch import nn


def head(features, classes):
    return nn.Sequential(nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, classes))
"""

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "model", "small", "fast", "quantization",
         "keeps", "models", "runs", "int8", "onnx", "is", "good", "and", "of", "to", "in", "it"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", ".", ","]
SENTENCES = ["The cat sat on the mat.", "A small model runs fast.", "",
             "Quantization keeps models small.", "  the dog is good  ", "zebra"]




def write_onnx(path, input_name: str = "pixels") -> None:
    """A one-node ONNX model (Relu over ``N x 4`` floats)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", [input_name], ["scores"])], "relu",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    original = write_bert_folder(folder, VOCAB, transformers_extras=True)
    return folder, original


@pytest.fixture
def photos(tmp_path):
    """Labelled photos: three class folders, JPEG and PNG, one grey image."""
    root = tmp_path / "photos"
    save_photo(skdata.chelsea(), root / "cat" / "chelsea.jpg")
    save_photo(skdata.coffee(), root / "cup" / "coffee.png")
    save_photo(skdata.astronaut(), root / "person" / "astronaut.jpg")
    save_photo(skdata.camera(), root / "person" / "camera.png")
    return root


# -- model sources -------------------------------------------------------------------


def test_module_function_gives_eval_module_and_forward_names():
    model = load_model("quantaware.models:DigitsCNN")
    assert isinstance(model.module, DigitsCNN) and not model.module.training
    assert not model.is_onnx and model.tokenizer is None and model.onnx_path is None
    assert model.input_names == ("x",)
    assert model.require_torch("export") is model.module


def test_python_file_with_weights_gives_the_original_outputs(tmp_path):
    (tmp_path / "user_model.py").write_text(USER_MODEL)
    (tmp_path / "user_model_blocks.py").write_text(USER_BLOCKS)
    sys.path.insert(0, str(tmp_path))
    try:
        import user_model
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("user_model", None)
    torch.manual_seed(7)
    original = user_model.build().eval()
    with torch.no_grad():
        original.bn.running_mean.uniform_(-1, 1)
        original.bn.running_var.uniform_(0.5, 2)
    torch.save(original.state_dict(), tmp_path / "weights.pt")
    x = torch.randn(5, 3, 8, 8)

    path_before = list(sys.path)
    loaded = load_model(f"{tmp_path / 'user_model.py'}:build", tmp_path / "weights.pt")
    assert sys.path == path_before  # the file's folder is on sys.path only while it imports
    assert not loaded.module.training and loaded.input_names == ("x",)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), original(x))
        fresh = load_model(f"{tmp_path / 'user_model.py'}:build").module
        assert not torch.allclose(fresh(x), original(x))  # the weights made the difference
    sys.modules.pop("user_model_blocks", None)


@pytest.mark.parametrize("layout", ["plain.pt", "state_dict.pth", "model.pt", "safetensors"])
def test_weights_file_layouts(tmp_path, layout):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = net.state_dict()
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        safetensors_torch.save_file(state, str(path))
    else:
        path = tmp_path / ("w" + layout[layout.index("."):])
        key = layout.split(".")[0]
        torch.save(state if key == "plain" else {key: state, "epoch": 3}, path)
    torch.manual_seed(2)
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert load_weights(target, path) is target
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_weights_that_would_run_code_are_refused_without_running_it(tmp_path, how):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pt"
    payload = {"0.weight": Exploit(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(SourceError, match="would run code") as refused:
        load_weights(nn.Sequential(nn.Linear(2, 2)), path)
    # names what the file would call, and does not pass on torch's advice to load it unsafely
    assert "weights_only" not in str(refused.value)
    assert how == "pickle.dump" or "the global exec" in str(refused.value)
    with pytest.raises(SourceError, match="would run code"):
        load_model("quantaware.models:DigitsCNN", path)
    assert not marker.exists()


def test_a_whole_pickled_module_is_refused(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(SourceError, match=r"torch\.save\(model\.state_dict\(\), path\)"):
        load_weights(nn.Linear(2, 2), tmp_path / "module.pt")


@pytest.mark.parametrize("keep", [0, 0.5, 0.95])
def test_truncated_weights_file(tmp_path, keep):
    torch.save(nn.Linear(8, 8).state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(SourceError, match="truncated"):
        load_weights(nn.Linear(8, 8), tmp_path / "cut.pt")


@pytest.mark.parametrize("text", ["these are not weights\n", "hello world",
                                  '{"fc.weight": [[1, 2]]}', b"\xb0\x01 random",
                                  b"\x80\x02 junk that starts like a pickle"])
def test_weights_file_that_is_not_a_torch_file(tmp_path, text):
    """Junk is junk: JSON or random bytes were said to be a pickle that "would run
    code"."""
    if isinstance(text, bytes):
        (tmp_path / "notes.pt").write_bytes(text)
    else:
        (tmp_path / "notes.pt").write_text(text)
    with pytest.raises(SourceError, match=r"notes\.pt") as refused:
        load_weights(nn.Linear(2, 2), tmp_path / "notes.pt")
    assert "would run code" not in str(refused.value)


def test_safetensors_suffix_in_capitals(tmp_path):
    net = nn.Linear(3, 2)
    safetensors_torch.save_file(net.state_dict(), str(tmp_path / "W.SAFETENSORS"))
    loaded = load_weights(nn.Linear(3, 2), tmp_path / "W.SAFETENSORS")
    assert torch.equal(loaded.weight, net.weight)


def test_truncated_safetensors_file(tmp_path):
    safetensors_torch.save_file(nn.Linear(8, 8).state_dict(), str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(SourceError, match=r"cannot read .*as safetensors"):
        load_weights(nn.Linear(8, 8), tmp_path / "w.safetensors")


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_model("quantaware.models:DigitsCNN", tmp_path / "nope.pt")


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("1.bias"), r"missing \['1\.bias'\]"),
    (lambda s: s.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
    (lambda s: s.update({"0.weight": torch.zeros(5, 3)}),
     r"0\.weight: file \(5, 3\) vs model \(4, 3\)"),
])
def test_weights_that_do_not_fit_leave_the_model_alone(tmp_path, change, message):
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = {k: v.clone() + 1 for k, v in net.state_dict().items()}
    change(state)
    torch.save(state, tmp_path / "w.pt")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(SourceError, match=message):
        load_weights(net, tmp_path / "w.pt")
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("payload", [[torch.zeros(2)], {"weight": torch.zeros(2), "step": 3}])
def test_weights_file_without_a_state_dict(tmp_path, payload):
    torch.save(payload, tmp_path / "w.pt")
    with pytest.raises(SourceError, match="does not hold a state dict"):
        load_weights(nn.Linear(2, 2), tmp_path / "w.pt")


def test_function_returning_something_else_than_a_module(tmp_path):
    (tmp_path / "factory.py").write_text("def build():\n    return [1, 2]\n")
    with pytest.raises(SourceError, match=r"returned list, expected a torch\.nn\.Module"):
        load_model(f"{tmp_path / 'factory.py'}:build")


def user_modules() -> set[str]:
    """Modules imported from user files (by path) that are still registered."""
    return {name for name in sys.modules if name.startswith("_quantaware_user_")}


def test_python_file_that_raises_on_import(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    modules, path = user_modules(), list(sys.path)
    with pytest.raises(SourceError, match="failed while importing: RuntimeError: no GPU here"):
        load_model(f"{tmp_path / 'broken.py'}:build")
    assert user_modules() == modules and sys.path == path


def test_python_file_with_a_missing_import_leaves_no_module_behind(tmp_path):
    (tmp_path / "needs.py").write_text("import no_such_package_for_quantaware\n")
    modules = user_modules()
    with pytest.raises(SourceError, match="no_such_package_for_quantaware"):
        load_model(f"{tmp_path / 'needs.py'}:build")
    assert user_modules() == modules


@pytest.mark.parametrize("spec, error, message", [
    ("no_such_module_for_quantaware:build", SourceError, "cannot import module"),
    ("quantaware.models:NoSuchNet", SourceError, "has no attribute 'NoSuchNet'"),
    ("quantaware.models:__doc__", SourceError, "is not callable"),
    ("resnet", SourceError, "unknown model 'resnet'"),
    ("", SourceError, "non-empty string"),
    ("weights.pt", FileNotFoundError, "does not exist"),
    ("models/mine", FileNotFoundError, "does not exist"),
    ("missing.onnx", FileNotFoundError, "does not exist"),
])
def test_bad_model_specs(spec, error, message):
    with pytest.raises(error, match=message):
        load_model(spec)


def test_missing_python_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(f"{tmp_path / 'mine.py'}:build")


def test_onnx_file_is_an_inference_only_source(tmp_path):
    write_onnx(tmp_path / "m.onnx", input_name="pixels")
    model = load_model(str(tmp_path / "m.onnx"))
    assert model.is_onnx and model.module is None
    assert model.onnx_path == tmp_path / "m.onnx" and model.input_names == ("pixels",)
    with pytest.raises(SourceError, match="quantization needs the PyTorch model"):
        model.require_torch("quantization")
    with pytest.raises(SourceError, match="--weights applies to MODULE:FUNCTION"):
        load_model(str(tmp_path / "m.onnx"), weights=tmp_path / "w.pt")


def test_onnx_file_that_is_not_onnx(tmp_path):
    (tmp_path / "m.onnx").write_text("<html>404 not found</html>")
    with pytest.raises(SourceError, match="is not a readable ONNX model"):
        load_model(str(tmp_path / "m.onnx"))


def test_empty_onnx_file(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(SourceError, match=r"m\.onnx"):
        load_model(str(tmp_path / "m.onnx"))


def test_model_folder_loads_weights_and_tokenizer(bert):
    folder, original = bert
    model = load_model(str(folder))
    assert isinstance(model.module, MiniLM) and not model.module.training
    assert model.input_names == ("input_ids", "attention_mask")
    for key, value in original.state_dict().items():
        assert torch.equal(model.module.state_dict()[key], value), key
    batch = model.tokenizer(["The cat sat.", "zebra"])
    assert set(batch) == {"input_ids", "attention_mask"}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == torch.int64
    # [CLS] the cat sat . [SEP], then [PAD]; an unknown word is [UNK].
    assert ids[0, :6].tolist() == [2, VOCAB.index("the"), VOCAB.index("cat"),
                                   VOCAB.index("sat"), VOCAB.index("."), 3]
    assert ids[1, :3].tolist() == [2, 1, 3] and ids[1, 3:].eq(0).all()
    assert mask.sum(1).tolist() == [6, 3]
    with torch.no_grad():
        torch.testing.assert_close(model.module(ids, mask), original(ids, mask))


@pytest.mark.parametrize("breakage, weights, message", [
    ("config.json", None, "without config.json"),
    ("tokenizer.json", None, "has no tokenizer.json"),
    ("model_type", None, "holds a 'gpt2' model"),
    (None, "w.pt", "a model folder carries its own weights"),
])
def test_model_folder_problems(tmp_path, breakage, weights, message):
    write_bert_folder(tmp_path / "m", VOCAB, transformers_extras=True)
    if breakage == "model_type":
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    elif breakage:
        (tmp_path / "m" / breakage).unlink()
    with pytest.raises(SourceError, match=message):
        load_model(str(tmp_path / "m"), weights)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_model_folder_with_a_corrupt_file(tmp_path, name):
    write_bert_folder(tmp_path / "m", VOCAB, transformers_extras=True)
    path = tmp_path / "m" / name
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SourceError, match=name):
        load_model(str(tmp_path / "m"))


# -- data sources --------------------------------------------------------------------


def test_digits_splits_batches_and_limit():
    train = load_data("digits", split="train", batch_size=100, limit=250)
    assert train.labeled and train.classes is None and train.name == "digits"
    assert [x.shape[0] for x in train.inputs] == [100, 100, 50]
    assert train.num_samples == 250 and train.labels.shape == (250,)
    assert train.labels.dtype == torch.int64 and set(train.labels.tolist()) == set(range(10))
    assert train.example.shape == (1, 1, 8, 8)
    assert load_data("digits", split="train").num_samples == 1437
    test = load_data("digits", split="test", batch_size=1000)
    assert test.num_samples == 360 and len(test.batches) == 1
    assert not torch.equal(test.inputs[0][:250], torch.cat(train.inputs))


def test_mnist1d():
    data = load_data("mnist1d", split="test", batch_size=4, limit=10)
    assert data.labeled and data.num_samples == 10 and len(data.batches) == 3
    assert data.example.shape == (1, 1, 40) and data.labels.max() < 10


def test_labelled_image_folder(photos):
    data = load_data(str(photos), size=32, batch_size=3)
    assert data.labeled and data.classes == ["cat", "cup", "person"]
    assert data.labels.tolist() == [0, 1, 2, 2]
    assert [x.shape for x in data.inputs] == [(3, 3, 32, 32), (1, 3, 32, 32)]
    torch.testing.assert_close(data.example[0], ImageFolder(photos, size=32)[0][0])
    limited = load_data(str(photos), size=32, resize=40, limit=2)
    # spread over the sorted images: the first and the third, not the first two
    assert limited.num_samples == 2 and limited.labels.tolist() == [0, 2]


def test_labels_file_orders_the_classes(photos, tmp_path):
    (tmp_path / "labels.txt").write_text("person\ncat\nrocket\ncup\n\n")
    names = read_labels(tmp_path / "labels.txt")
    assert names == ["person", "cat", "rocket", "cup"]
    data = load_data(str(photos), size=32, class_names=names)
    assert data.classes == ["cat", "cup", "person"] and data.labels.tolist() == [1, 3, 0, 0]


def test_class_folders_named_by_integers_are_class_indices(tmp_path):
    save_photo(skdata.chelsea(), tmp_path / "281" / "a.png")
    save_photo(skdata.coffee(), tmp_path / "967" / "b.jpg")
    assert load_data(str(tmp_path), size=32).labels.tolist() == [281, 967]


def test_unlabelled_image_folder(photos):
    loose = photos / "person"  # images only: calibration data without labels
    data = load_data(str(loose), size=32)
    assert not data.labeled and data.labels is None and data.classes is None
    assert data.num_samples == 2 and data.example.shape == (1, 3, 32, 32)
    forced = load_data(str(photos), size=32, labeled=False, batch_size=8)
    assert not forced.labeled and forced.num_samples == 4


def test_image_folder_with_a_file_that_is_not_an_image(photos):
    (photos / "cup" / "README.md").write_text("photos of cups")
    with pytest.raises(ImageFolderError, match=r"README\.md"):
        load_data(str(photos), size=32)


def test_image_folder_with_a_broken_image(photos):
    (photos / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageFolderError, match=r"cannot read image .*broken\.jpg"):
        load_data(str(photos), size=32)


def test_class_folders_missing_from_the_labels_file(photos):
    with pytest.raises(SourceError, match=r"\['cup', 'person'\].*not in the labels file"):
        load_data(str(photos), size=32, class_names=["cat", "dog"])


def test_class_folder_named_twice_in_the_labels_file_is_ambiguous(photos):
    # ImageNet's class list names two classes "crane" (bird 134, machine 517).
    names = ["cat", "crane", "cup", "person", "crane"]
    save_photo(skdata.rocket(), photos / "crane" / "rocket.png")
    with pytest.raises(SourceError, match="crane"):
        load_data(str(photos), size=32, class_names=names)


def test_empty_image_folder(tmp_path):
    with pytest.raises(ImageFolderError, match="no images"):
        load_data(str(tmp_path))


@pytest.mark.parametrize("text, message", [
    ("cat\n\ndog\n", "line 2 of labels file .* is empty"),
    ("\n\n", "is empty; give one class name per line"),
    ("", "is empty; give one class name per line"),
])
def test_bad_labels_files(tmp_path, text, message):
    (tmp_path / "labels.txt").write_text(text)
    with pytest.raises(SourceError, match=message):
        read_labels(tmp_path / "labels.txt")


def test_labels_file_encoding_line_endings_and_missing(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"cat\r\ndog\r\n")
    assert read_labels(tmp_path / "crlf.txt") == ["cat", "dog"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SourceError, match="not UTF-8"):
        read_labels(tmp_path / "latin1.txt")
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        read_labels(tmp_path / "nope.txt")


def test_text_file_is_tokenised_with_the_models_tokenizer(bert, tmp_path):
    model = load_model(str(bert[0]))
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES) + "\n")
    data = load_data(str(tmp_path / "s.txt"), model, batch_size=2)
    assert not data.labeled and data.labels is None
    assert data.num_samples == 5 and [b["input_ids"].shape[0] for b in data.inputs] == [2, 2, 1]
    expected = model.tokenizer([s.strip() for s in SENTENCES if s.strip()])
    for key in ("input_ids", "attention_mask"):
        torch.testing.assert_close(torch.cat([b[key] for b in data.inputs]), expected[key])
    assert data.example["input_ids"].shape == (1, 16)
    assert load_data(str(tmp_path / "s.txt"), model, limit=3).num_samples == 3


def test_text_file_needs_a_model_with_a_tokenizer(tmp_path):
    (tmp_path / "s.txt").write_text("a sentence\n")
    for model in (None, load_model("quantaware.models:DigitsCNN")):
        with pytest.raises(SourceError, match="need the model's tokenizer"):
            load_data(str(tmp_path / "s.txt"), model)


def test_empty_missing_and_undecodable_text_files(bert, tmp_path):
    model = load_model(str(bert[0]))
    (tmp_path / "empty.txt").write_text("\n   \n\n")
    with pytest.raises(SourceError, match="has no sentences"):
        load_data(str(tmp_path / "empty.txt"), model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(str(tmp_path / "missing.txt"), model)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(SourceError, match="not UTF-8"):
        load_data(str(tmp_path / "latin1.txt"), model)


# Data functions for MODULE:FUNCTION specs.

def tensors():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 2, generator=gen) for _ in range(3)]


def pairs():
    for x in tensors():
        yield x, [0, 1, 0, 1]


def loader():
    x = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    return DataLoader(TensorDataset(x, torch.arange(10)), batch_size=4)


def dicts():
    return [{"input_ids": torch.ones(3, 5, dtype=torch.int64),
             "attention_mask": torch.ones(3, 5, dtype=torch.int64)}] * 2


def unlabelled_loader():
    return DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=4)


def numpy_batches():
    return [np.zeros((4, 2), np.float32), np.ones((2, 2), np.float32)]


def dicts_with_labels():
    return [{"x": torch.zeros(4, 2), "label": torch.tensor([0, 1, 0, 1])}]


def returns_none():
    return None


def returns_a_tensor():
    return torch.zeros(4, 2)


def yields_strings():
    return ["a", "b"]


def dict_of_lists():
    return [{"input_ids": [1, 2, 3]}]


def label_count_mismatch():
    return [(torch.zeros(4, 2), torch.zeros(3, dtype=torch.int64))]


def input_named_y():
    return [{"x": torch.zeros(4, 2), "y": torch.zeros(4, 3)}]


def mixed_labels():
    return [(torch.zeros(4, 2), torch.zeros(4)), torch.zeros(4, 2)]


def empty():
    return []


def scalars():
    return [torch.tensor(1.0)]


def test_function_yielding_tensors():
    data = load_data(f"{__name__}:tensors")
    assert not data.labeled and data.labels is None and data.num_samples == 12
    for got, want in zip(data.inputs, tensors(), strict=True):
        assert torch.equal(got, want)
    limited = load_data(f"{__name__}:tensors", limit=6)
    assert [x.shape[0] for x in limited.inputs] == [4, 2]
    assert torch.equal(limited.inputs[1], tensors()[1][:2])


def test_function_yielding_pairs_and_a_dataloader():
    data = load_data(f"{__name__}:pairs", limit=10)
    assert data.labeled and data.num_samples == 10
    assert data.labels.tolist() == [0, 1, 0, 1] * 2 + [0, 1]
    batches = load_data(f"{__name__}:loader")
    assert batches.labeled and batches.labels.tolist() == list(range(10))
    assert [x.shape[0] for x in batches.inputs] == [4, 4, 2]


def ragged_dicts():
    return [{"input_ids": torch.ones(2, 5, dtype=torch.int64)},
            {"input_ids": torch.ones(2, 7, dtype=torch.int64)}]


def test_a_given_batch_size_regroups_a_functions_batches():
    kept = load_data(f"{__name__}:loader")
    regrouped = load_data(f"{__name__}:loader", batch_size=3)
    assert [x.shape[0] for x in regrouped.inputs] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(regrouped.inputs), torch.cat(kept.inputs))
    assert regrouped.labels.tolist() == list(range(10))
    dicts_ = load_data(f"{__name__}:dicts", batch_size=4)
    assert [b["input_ids"].shape[0] for b in dicts_.inputs] == [4, 2]
    assert load_data(f"{__name__}:ragged_dicts").num_samples == 4  # kept as they are
    with pytest.raises(SourceError, match=r"samples differ in shape.*leave the batch size out"):
        load_data(f"{__name__}:ragged_dicts", batch_size=4)


def test_function_yielding_dicts():
    data = load_data(f"{__name__}:dicts", limit=4)
    assert not data.labeled and data.num_samples == 4
    assert [b["input_ids"].shape[0] for b in data.inputs] == [3, 1]
    assert set(data.example) == {"input_ids", "attention_mask"}
    assert data.example["attention_mask"].shape == (1, 5)


def test_data_function_in_a_python_file(tmp_path):
    (tmp_path / "calib.py").write_text(
        "import torch\n\ndef batches():\n    return [torch.ones(2, 3), torch.zeros(1, 3)]\n")
    data = load_data(f"{tmp_path / 'calib.py'}:batches")
    assert data.num_samples == 3 and data.inputs[1].sum() == 0


@pytest.mark.parametrize("function, labeled, samples", [
    ("unlabelled_loader", False, 10), ("numpy_batches", False, 6), ("dicts_with_labels", True, 4)])
def test_data_functions_following_the_batch_convention(function, labeled, samples):
    data = load_data(f"{__name__}:{function}")
    assert data.labeled == labeled and data.num_samples == samples
    first = data.inputs[0]
    assert isinstance(first, torch.Tensor) or set(first) == {"x"}


@pytest.mark.parametrize("function, message", [
    ("returns_none", "returned NoneType; return an iterable"),
    ("returns_a_tensor", "returned Tensor; return an iterable"),
    ("yields_strings", "batch 0: cannot use a batch of type str"),
    ("dict_of_lists", "dict whose values are not all tensors"),
    ("label_count_mismatch", "batch 0 has 4 inputs but 3 labels"),
    ("input_named_y", r"4 inputs but 12 labels \(its 'y' key is read as the labels"),
    ("mixed_labels", r"some batches carry labels and some do not \(batch 1\)"),
    ("empty", "yielded no batches"),
    ("scalars", "0-d tensor"),
    ("no_such_function", "has no attribute"),
])
def test_bad_data_functions(function, message):
    with pytest.raises(SourceError, match=message):
        load_data(f"{__name__}:{function}")


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch size must be a positive integer"),
    ({"batch_size": -2}, "batch size must be a positive integer"),
    ({"batch_size": True}, "batch size must be a positive integer"),
    ({"batch_size": 2.5}, "batch size must be a positive integer"),
    ({"limit": 0}, "sample limit must be a positive integer"),
    ({"split": "validation"}, "split must be 'train' or 'test'"),
])
def test_bad_data_options(kwargs, message):
    with pytest.raises(SourceError, match=message):
        load_data("digits", **kwargs)


def test_data_that_is_not_a_source(tmp_path):
    with pytest.raises(SourceError, match="non-empty string"):
        load_data("")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SourceError, match="not a source quantaware reads"):
        load_data(str(tmp_path / "table.csv"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(str(tmp_path / "photos"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(f"{tmp_path / 'calib.py'}:batches")


def test_data_source_properties():
    x = torch.arange(6.0).reshape(3, 2)
    labelled = DataSource("pairs", [(x, torch.tensor([1, 2, 3])), (x[:1], torch.tensor([[4]]))],
                          labeled=True)
    assert labelled.num_samples == 4 and labelled.labels.tolist() == [1, 2, 3, 4]
    assert torch.equal(labelled.example, x[:1]) and torch.equal(labelled.inputs[1], x[:1])
    model = LoadedModel("m", module=nn.Identity())
    assert not model.is_onnx and model.input_names == ("input",)


def test_a_weights_file_given_as_the_model_says_how_to_load_it(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(SourceError, match=r"is a file, not a model source.*--weights"):
        load_model(str(path))
    (tmp_path / "model.tflite").write_bytes(b"TFL3")
    with pytest.raises(SourceError, match=r"is a LiteRT file: give the torch model .* evaluate"):
        load_model(str(tmp_path / "model.tflite"))


def test_data_with_nan_or_inf_is_refused_naming_the_batch():
    """NaN evaluation data gave 'cosine nan' and a results.json with a bare NaN."""
    from quantaware.sources import DataSource, SourceError

    good, bad = torch.zeros(4, 3), torch.zeros(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(SourceError, match=r"mine: batch 1 contains 1 NaN/Inf value\(s\)"):
        DataSource("mine", [(good, torch.zeros(4)), (bad, torch.zeros(4))], labeled=True)
    with pytest.raises(SourceError, match="batch 0 contains 1 NaN/Inf"):
        DataSource("pairs", [((good, bad), torch.zeros(4))], labeled=True)
    ids = torch.zeros(2, 5, dtype=torch.long)  # integer inputs are not checked
    assert DataSource("text", [{"input_ids": ids}], labeled=False).num_samples == 2


def raises_key_error():
    raise KeyError("nope")


def fails_midway():
    yield torch.zeros(2, 2)
    raise KeyError("the third file")


def test_what_the_users_functions_raise_is_named_with_their_spec():
    """A KeyError from the user's model or data function escaped as a traceback."""
    with pytest.raises(SourceError, match=r"raises_key_error raised KeyError: 'nope'"):
        load_model(f"{__name__}:raises_key_error")
    with pytest.raises(SourceError, match=r"raises_key_error raised KeyError: 'nope'"):
        load_data(f"{__name__}:raises_key_error")
    with pytest.raises(SourceError, match=r"fails_midway: producing batch 1 raised KeyError"):
        load_data(f"{__name__}:fails_midway")
