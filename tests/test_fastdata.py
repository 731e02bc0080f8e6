"""The fast data path (normkit.fastdata) on the CPU: same batches as the plain path, in distribution."""

from __future__ import annotations

import pytest
import torch

from normkit.fastdata import IMAGENET_MEAN, IMAGENET_STD, FastPath, TensorLoader, decode, eval_is_per_sample, make_fast_dls
from normkit.runs import PROTOCOLS, RunConfig, train

SMOKE = PROTOCOLS["smoke"]


@pytest.fixture
def data(mini_data):
    """(data folder, its identity); conftest gives every test its own cache and results folders."""
    from normkit.data import data_info

    return mini_data, data_info(mini_data).identity


def _fast(path, bs=8, **kw):
    return make_fast_dls(path, bs, SMOKE.size, device="cpu", max_train=SMOKE.max_train, max_valid=SMOKE.max_valid, **kw)


def _denorm(x):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def test_batches_match_the_plain_path(data):
    from normkit.data import make_dls

    path, _ = data
    fast = _fast(path, valid_bs=128)  # the plain path validates in batches of 128
    plain = make_dls(path, 8, SMOKE.size, device="cpu", num_workers=0, max_train=SMOKE.max_train, max_valid=SMOKE.max_valid)
    assert list(fast.vocab) == list(plain.vocab)
    assert (len(fast.train), len(fast.valid)) == (len(plain.train), len(plain.valid))
    assert fast.device == torch.device("cpu") and fast.train.bs == 8 and fast.train.n == len(plain.train_ds)
    x, y = fast.train.one_batch()
    assert x.shape == (8, 3, SMOKE.size, SMOKE.size) and x.dtype == torch.float32 and y.dtype == torch.int64
    pix = _denorm(x)  # normalised uint8 pixels: back to whole numbers in [0, 255]
    assert pix.min() > -1e-3 and pix.max() < 255 + 1e-3 and (pix - pix.round()).abs().max() < 1e-3
    # validation: the very same items, in the same order, with the same labels
    for (xp, yp), (xf, yf) in zip(plain.valid, fast.valid):
        assert torch.equal(yp.cpu(), yf) and (xp.cpu() - xf).abs().max() < 1e-4
    # training: the same multiset of images over an epoch, up to flips
    seen = torch.cat([xb for xb, _ in fast.train])
    assert len(seen) == len(plain.train) * 8


def test_drop_last_and_partial_validation_batch(data):
    path, _ = data
    dls = _fast(path, bs=7, valid_bs=7)
    n_train, n_valid = dls.train.n, dls.valid.n
    sizes = [len(y) for _, y in dls.train]
    assert len(dls.train) == n_train // 7 and set(sizes) == {7}
    vs = [len(y) for _, y in dls.valid]
    assert len(vs) == len(dls.valid) == -(-n_valid // 7) and sum(vs) == n_valid


def _synthetic(n=400, size=8, width=None, **kw):
    g = torch.Generator().manual_seed(1)
    width = width or size
    images = torch.randint(0, 256, (n, 3, size, width), dtype=torch.uint8, generator=g)
    return TensorLoader(images, torch.arange(n) % 3, 10, vocab=["a", "b", "c"], train=True, size=size, **kw)


@pytest.mark.parametrize("train,drop_last,channels_last", [(True, True, False), (True, False, True), (False, False, False)])
def test_batches_made_by_the_chunk_are_those_made_one_at_a_time(train, drop_last, channels_last):
    """A loader augments ``chunk`` images at once and hands out slices: bit for bit the batches of
    one batch at a time (chunk <= bs), crops of non-square images, flips and a partial last batch
    included."""
    g = torch.Generator().manual_seed(2)
    n, size = 53, 16
    images = torch.randint(0, 256, (n, 3, size, 24), dtype=torch.uint8, generator=g)
    lengths = torch.randint(size, 25, (n,), generator=g)
    transposed = torch.rand(n, generator=g) < 0.3

    def batches(chunk):
        dl = TensorLoader(images, torch.arange(n), 4, vocab=["a"], train=train, seed=3, size=size, lengths=lengths,
                          transposed=transposed, drop_last=drop_last, channels_last=channels_last, chunk=chunk)
        return [(x.clone(), y.clone()) for _ in range(2) for x, y in dl]  # two epochs

    one = batches(1)
    assert len(one) == 2 * (n // 4 if drop_last else -(-n // 4))
    for chunk in (7, 12, 1024):
        got = batches(chunk)
        assert len(got) == len(one)
        for (x, y), (x1, y1) in zip(got, one):
            assert torch.equal(x, x1) and torch.equal(y, y1)
            assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with pytest.raises(ValueError, match="chunk=0 is invalid"):
        TensorLoader(images, torch.arange(n), 4, vocab=["a"], train=True, size=size, chunk=0)


def test_shuffling_is_deterministic_per_seed():
    def order(dl):
        return [y.tolist() for _, y in dl]

    a, b, c = _synthetic(seed=3), _synthetic(seed=3), _synthetic(seed=4)
    first = order(a)
    assert first == order(b) and first != order(c)
    assert order(a) != first  # a new permutation each epoch
    assert sorted(sum(first, [])) != sum(first, [])


def test_about_half_the_images_are_flipped():
    dl = _synthetic(n=400, seed=0)
    dl.labels = torch.arange(400)  # identify each image
    flipped = 0
    for x, idx in dl:
        pix = _denorm(x).round().to(torch.uint8)
        orig = dl.images[idx]
        is_flip = (pix == orig.flip(3)).flatten(1).all(1)
        assert (is_flip | (pix == orig).flatten(1).all(1)).all()
        flipped += int(is_flip.sum())
    assert abs(flipped - 200) < 40  # 4 standard deviations of Binomial(400, 0.5)
    valid = TensorLoader(dl.images, dl.labels, 50, vocab=dl.vocab, train=False)
    assert all(torch.allclose(_denorm(x).round(), dl.images[i].float()) for x, i in valid)  # no flips in validation


def test_random_crops_of_non_square_images(tmp_path, data):
    """Non-square training images: shorter side to ``size``, a uniformly placed crop of the longer."""
    import numpy as np
    from fastai.vision.all import PILImage, Resize
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n1", "n2"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i, (w, h) in enumerate([(48, 32), (32, 48), (32, 32)]):
                pix = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pix).save(tmp_path / split / cls / f"{cls}_{i}.png")
    d = decode(tmp_path, 16)
    assert d["train_x"].shape == (6, 3, 16, 24) and d["train_len"].tolist() == [24, 24, 16] * 2
    assert d["train_t"].tolist() == [False, True, False] * 2 and d["valid_x"].shape == (6, 3, 16, 16)
    first_val = sorted((tmp_path / "val" / "n1").iterdir())[0]
    centre = np.asarray(Resize(16)(PILImage.create(first_val), split_idx=1))  # the plain path's validation item
    assert torch.equal(d["valid_x"][0], torch.from_numpy(centre.copy()).permute(2, 0, 1))
    dl = TensorLoader(d["train_x"], torch.arange(6), 2, vocab=d["vocab"], train=True, size=16, lengths=d["train_len"],
                      transposed=d["train_t"])
    offsets = set()
    for _ in range(30):
        for x, idx in dl:
            for img, i in zip(_denorm(x).round().to(torch.uint8), idx.tolist()):
                src = d["train_x"][i]
                views = [img, img.flip(2)]  # as drawn, and unflipped
                if d["train_t"][i]:  # portrait: stored with its long side along the width
                    views = [v.transpose(1, 2) for v in views]
                wins = [k for k in range(9) if any(torch.equal(v, src[..., k:k + 16]) for v in views)]
                assert wins, "every training image is a window of its stored image"
                if int(d["train_len"][i]) == 24:
                    offsets.update(wins)
    assert offsets >= set(range(8))  # all of the offsets fastai's Resize can draw occur


def _non_square(n=6, size=16, long=24):
    """Stored images as decode() leaves non-square ones: landscape, and portraits transposed."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (n, 3, size, long), dtype=torch.uint8, generator=g)
    lengths = torch.tensor([long, long, size] * (n // 3))
    transposed = torch.tensor([False, True, False] * (n // 3))
    images[lengths == size, ..., size:] = 0  # the zero padding of a square image
    return images, lengths, transposed


def _upright(img, transposed):
    return img.transpose(1, 2) if transposed else img


def test_unaugmented_loaders_take_the_centre_of_non_square_images_upright():
    images, lengths, transposed = _non_square()
    dl = TensorLoader(images, torch.arange(6), 4, vocab=["a"], train=False, size=16, lengths=lengths,
                      transposed=transposed)
    got = [(img, i) for x, y in dl for img, i in zip(_denorm(x).round().to(torch.uint8), y.tolist())]
    assert [i for _, i in got] == list(range(6))  # in order, every image (a partial last batch)
    for img, i in got:
        off = int(0.5 * (int(lengths[i]) - 16))  # fastai's Resize on the validation split
        assert torch.equal(img, _upright(images[i][..., off:off + 16], bool(transposed[i]))), i


def test_new_keeps_the_augmentation_and_takes_fastai_keywords():
    """``get_preds`` on a training loader: ``new(shuffle=False, drop_last=False)`` is still augmented."""
    images, lengths, transposed = _non_square()
    dl = TensorLoader(images, torch.arange(6), 4, vocab=["a"], train=True, size=16, lengths=lengths,
                      transposed=transposed)
    assert len(dl) == 1  # drops the partial batch
    preds = dl.new(shuffle=False, drop_last=False, bs=5, num_workers=0)
    assert preds.train and preds.bs == 5 and len(preds) == 2
    for _ in range(5):
        seen = []
        for x, y in preds:
            for img, i in zip(_denorm(x).round().to(torch.uint8), y.tolist()):
                src = images[i]
                views = [_upright(v, bool(transposed[i])) for v in (img, img.flip(2))]
                assert any(torch.equal(v, src[..., k:k + 16]) for v in views for k in range(9)), i
                seen.append(i)
        assert seen == list(range(6))
    assert dl.new().shuffle and dl.new().drop_last and dl.new().bs == 4


def test_decoded_data_is_cached(data, monkeypatch):
    import normkit.fastdata as fd

    path, _ = data
    decode(path, SMOKE.size, max_train=SMOKE.max_train, max_valid=SMOKE.max_valid)
    assert fd.decoded_path(path, SMOKE.size, SMOKE.max_train, SMOKE.max_valid).exists()
    monkeypatch.setattr(fd, "_decode_one", lambda *a: pytest.fail("decoded again"))
    assert decode(path, SMOKE.size, max_train=SMOKE.max_train, max_valid=SMOKE.max_valid)["train_x"].dtype == torch.uint8


def test_a_learner_trains_on_it_and_the_record_says_how(data):
    path, identity = data
    config = RunConfig.make("cnn", "batchnorm", 8, 1e-2, 0, data=identity, protocol="smoke")
    record = train(config, path, device="cpu", fast=FastPath())
    assert record["status"] == "ok" and 0 <= record["final"]["accuracy"] <= 1
    s = record["settings"]
    assert s["data_path"].startswith("fast") and s["valid_bs"] == 128 and "AdamW" in s["optimizer"]
    assert s["channels_last"] is False and "cudnn_allow_tf32" in s


def test_compiled_model_gives_the_eager_result_to_float_rounding(data):
    """torch.compile (inductor on the CPU) trains the same run to the same numbers, up to the
    rounding its fused kernels change; the record says it was compiled."""
    path, identity = data
    config = RunConfig.make("cnn", "batchnorm", 8, 1e-2, 0, data=identity, protocol="smoke")
    eager = train(config, path, device="cpu", fast=FastPath())
    compiled = train(config, path, device="cpu", fast=FastPath(compile="default"))
    assert compiled["settings"]["compile"] == "default" and eager["settings"]["compile"] is None
    for k in ("valid_loss", "train_loss"):
        assert compiled["final"][k] == pytest.approx(eager["final"][k], rel=1e-3)
    assert abs(compiled["final"]["accuracy"] - eager["final"]["accuracy"]) <= 1 / 40  # one of 40 images at most


def test_bad_compile_mode_is_one_line():
    with pytest.raises(ValueError, match="compile='fast' is invalid; valid modes: default, reduce-overhead"):
        FastPath(compile="fast")


def test_fused_adamw_follows_fastais_adam(data):
    """The fast path's optimizer is fastai's Adam rule: the same trajectory, to float rounding."""
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import set_seed

    from normkit.fastdata import fused_adam
    from normkit.models import build_model

    path, _ = data
    params = []
    for fused in (False, True):
        dls = _fast(path, bs=16)  # 10 steps of fit_one_cycle
        set_seed(0, reproducible=True)
        model = build_model("cnn", "batchnorm", n_out=len(dls.vocab))
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), **(fused_adam(model, "cpu") if fused else {}))
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(1, 1e-2)
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-7


def test_valid_batch_size_only_where_eval_is_per_sample():
    from torch import nn

    from normkit.norms import register_norm

    register_norm("test_batchstats_eval", lambda c: nn.BatchNorm2d(c, track_running_stats=False), defaults={},
                  overwrite=True)
    assert eval_is_per_sample("cnn", "batchnorm") and eval_is_per_sample("cnn", "none")
    assert not eval_is_per_sample("cnn", "test_batchstats_eval")
    assert not eval_is_per_sample("resnet18", "test_batchstats_eval")


def test_per_sample_norms_pass_the_check_at_the_runs_image_size():
    """FRN is per sample; at 128 px (the study's size) the check must not mistake it for batch-dependent."""
    assert eval_is_per_sample("resnet18", "frn", 128) and eval_is_per_sample("resnet18", "groupnorm", 128)


def test_fast_optimizer_exempts_every_norm_layer_from_weight_decay():
    from normkit.fastdata import fused_adam
    from normkit.models import build_model
    from normkit.norms import norm_layers

    model = build_model("resnet18", "groupnorm")
    groups = fused_adam(model, "cpu")["splitter"](model)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    norm_params = [p for m in norm_layers(model) for p in m.parameters()]
    assert norm_params and not any(id(p) in decayed for p in norm_params)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(id(w) in decayed for w in convs)


def test_lean_learner_gives_the_same_record_bit_for_bit(data):
    """LeanLearner, LeanOptimWrapper and the plain-tensor loss change how much Python runs per
    step, not one number: the whole record (every epoch's losses and accuracy) is identical."""
    path, identity = data
    config = RunConfig.make("cnn", "batchnorm", 8, 1e-2, 0, data=identity, protocol="smoke")
    lean = train(config, path, device="cpu", fast=FastPath())
    fastai = train(config, path, device="cpu", fast=FastPath(lean=False))
    assert lean["epochs"] == fastai["epochs"] and lean["final"] == fastai["final"]
    assert lean["settings"]["learner"].startswith("normkit LeanLearner") and fastai["settings"]["learner"] == "fastai Learner"


class _Trace:
    """Callbacks that log each event they handle: some by method, one by a keyword (fastai's
    ``funcs_kwargs``), one that stops running its callbacks for the rest of the fit."""

    @staticmethod
    def callbacks(log):
        from fastai.callback.core import Callback

        class ByMethod(Callback):
            order = 5

            def before_fit(self): log.append(("by_method", "before_fit", self.learn.epoch if hasattr(self.learn, "epoch") else None))
            def after_pred(self): log.append(("by_method", "after_pred", self.learn.iter))  # before Late's
            def after_loss(self): log.append(("by_method", "after_loss", self.learn.iter))
            def after_batch(self): log.append(("by_method", "after_batch", self.learn.iter))  # after ValidOnly's
            def after_epoch(self): log.append(("by_method", "after_epoch", self.learn.epoch))
            def after_fit(self): log.append(("by_method", "after_fit", None))

        class Late(Callback):
            order = 90

            def before_batch(self): log.append(("late", "before_batch", self.learn.iter))
            def after_pred(self):
                log.append(("late", "after_pred", self.learn.iter))
                if self.learn.iter == 2:
                    self.run = False  # fastai's rule: no more events until after_fit resets it (Late has none)

        class ValidOnly(Callback):
            order = 1
            run_train = False

            def after_batch(self): log.append(("valid_only", "after_batch", self.learn.iter))

        by_kwarg = Callback(after_step=lambda *_: log.append(("by_kwarg", "after_step", None)))
        return [Late(), ByMethod(), ValidOnly(), by_kwarg]


def test_lean_learner_calls_the_same_callbacks_in_the_same_order(data):
    """The trace of every callback event (order, run flags, keyword-given methods, a callback
    added mid-way by get_preds) is fastai's own, and an unknown event is refused as fastai does."""
    from fastai.learner import Learner

    from normkit.fastdata import CrossEntropyLoss, LeanLearner
    from normkit.models import build_model

    path, _ = data
    traces = []
    for cls in (Learner, LeanLearner):
        log = []
        dls = _fast(path, bs=16)
        learn = cls(dls, build_model("cnn", "batchnorm", n_out=len(dls.vocab)), loss_func=CrossEntropyLoss(),
                    cbs=_Trace.callbacks(log))
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-3)
            learn.get_preds()
            learn.fit(1, 1e-3)
        traces.append(log)
        with pytest.raises(Exception, match="missing before_nothing"):
            learn("before_nothing")
        with pytest.raises(Exception, match="missing before_nothing"):
            learn(["after_create", "before_nothing"])  # a list of events, as fastai takes
    assert traces[0] == traces[1] and len(traces[0]) > 40
    late = [e for e in traces[1] if e[0] == "late"]
    assert ("late", "after_pred", 2) in late and ("late", "after_pred", 3) not in late  # run=False held
    assert [e for e in traces[1] if e[0] == "valid_only"]  # run_train=False: validation batches only


def test_lean_optim_wrapper_reports_fastais_hypers():
    from fastai.optimizer import OptimWrapper

    from normkit.fastdata import LeanOptimWrapper, fused_adam
    from normkit.models import build_model

    model = build_model("cnn", "groupnorm")
    kw = fused_adam(model, "cpu", lean=True)
    lean = kw["opt_func"](kw["splitter"](model), 3e-3)
    assert type(lean) is LeanOptimWrapper
    plain = OptimWrapper(kw["splitter"](model), opt=lean.opt.__class__, lr=3e-3, betas=(0.9, 0.99), eps=1e-5)
    lean.set_hyper("mom", 0.85)
    plain.opt.param_groups = lean.opt.param_groups
    assert lean.hypers == OptimWrapper.hypers.fget(lean) == plain.hypers
    assert lean.hypers[0]["mom"] == 0.85 and lean.hypers[0]["sqr_mom"] == 0.99 and lean.hypers[1]["wd"] == 0.0


def test_plain_tensor_loss_is_fastais_loss():
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import TensorBase

    from normkit.fastdata import CrossEntropyLoss

    pred, targ = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3, 9])
    ours, theirs = CrossEntropyLoss()(pred, targ), CrossEntropyLossFlat()(pred, targ)
    assert type(ours) is torch.Tensor and isinstance(theirs, TensorBase)
    assert torch.equal(ours, theirs.as_subclass(torch.Tensor))
    assert torch.equal(CrossEntropyLoss().decodes(pred), CrossEntropyLossFlat().decodes(pred))
