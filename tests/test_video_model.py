"""Video rows through both families' functional forward against transformers' own forward with the same video
inputs (pixel_values_videos, video_grid_thw, Qwen2.5-VL's second_per_grid_ts; Qwen3-VL's timestamp text between
frame groups), on tiny models trained first: a random model's loss hardly sees the frames or their order."""
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from vlm_sft import models as model_lib
from vlm_sft import optim
from vlm_sft import step as step_lib
from vlm_sft.data.collate import collate, collate_packed
from vlm_sft.state import init_train_state

IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, PAD = (151644, 151645, 151652, 151653, 151655,
                                                                         151656, 151643)
COLOUR_TOKENS = (1000, 2000, 3000, 4000)
TIMESTAMP = [27, 15, 13, 20, 6486, 29]  # "<0.5 seconds>"-like text between Qwen3-VL frame groups
# Per row: an image grid or None, the video grid (t, h, w) and its seconds per temporal step.
ROWS = [(None, (3, 4, 6), 1.0), ((1, 4, 4), (2, 6, 4), 0.5), (None, (4, 2, 4), 0.75), ((1, 2, 6), (3, 4, 4), 1.5)]
STEPS = 30
FAMILIES = {"qwen2.5_vl": ("tiny_model_dir", Qwen2_5_VLForConditionalGeneration, 14),
            "qwen3_vl": ("tiny_qwen3_vl_dir", Qwen3VLForConditionalGeneration, 16)}


def make_batch(g, spec, rows, patch, *, split_frames, reverse=False, packed=False):
    """Each frame group of a video is one colour (plus noise) and the answer names the colours in order, so a
    trained model's loss depends on the frames' order. Returns (our batch, transformers' inputs)."""
    dim = 3 * 2 * patch * patch
    patterns = torch.randn(len(COLOUR_TOKENS), dim, generator=torch.Generator().manual_seed(123))
    sequences, pixels, grids, video_grids, seconds = [], [], [], [], []
    hf_images, hf_videos = [], []
    for image, (t, h, w), spg in rows:
        ids, answer, row_pixels = [IM_START], [], []
        if image is not None:
            ids += [VISION_START] + [IMAGE_PAD] * (image[1] * image[2] // 4) + [VISION_END]
            hf_images.append(0.3 * torch.randn(image[1] * image[2], dim, generator=g))
            row_pixels.append(hf_images[-1])
        colours = torch.randint(len(COLOUR_TOKENS), (t,), generator=g).tolist()
        groups = [patterns[c] + 0.3 * torch.randn(h * w, dim, generator=g) for c in colours]
        ids.append(VISION_START)
        for _ in range(t):
            if split_frames:
                ids += TIMESTAMP + [VISION_START] + [VIDEO_PAD] * (h * w // 4) + [VISION_END]
            else:
                ids += [VIDEO_PAD] * (h * w // 4)
        ids.append(VISION_END)
        video = torch.cat(groups[::-1] if reverse else groups)
        hf_videos.append(video)
        row_pixels.append(video)
        answer = [COLOUR_TOKENS[c] for c in colours]
        ids += torch.randint(100, 900, (int(torch.randint(3, 6, (), generator=g)),), generator=g).tolist()
        target = answer + [IM_END]
        sequences.append((torch.tensor(ids + target), torch.tensor([-100] * len(ids) + target)))
        pixels.append(torch.cat(row_pixels))
        grids.append(torch.tensor([image]) if image is not None else torch.zeros(0, 3, dtype=torch.long))
        video_grids.append(torch.tensor([(t, h, w)]))
        seconds.append(torch.tensor([spg]))
    if packed:  # the rows back to back in one sequence, each with its own positions
        length = sum(len(ids) for ids, _ in sequences) + 5
        return collate_packed(sequences, pixels, grids, spec, length=length, pad_labels=False,
                              video_grids=video_grids, second_per_grid_ts=seconds), None
    batch = collate(sequences, pixels, grids, spec, video_grids=video_grids, second_per_grid_ts=seconds)
    labels = torch.full_like(batch["input_ids"], -100)
    labels.view(-1)[batch["label_index"] + 1] = batch["label_ids"]
    types = (batch["input_ids"] == IMAGE_PAD).int() + 2 * (batch["input_ids"] == VIDEO_PAD).int()
    hf = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
              mm_token_type_ids=types, pixel_values_videos=torch.cat(hf_videos),
              video_grid_thw=torch.cat(video_grids))
    if hf_images:
        hf.update(pixel_values=torch.cat(hf_images), image_grid_thw=torch.cat([x for x in grids if len(x)]))
    if not split_frames:
        hf["second_per_grid_ts"] = torch.cat(seconds)
    return batch, hf


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request):
    """A tiny model of the family after 30 AdamW steps on frame-colour batches, loaded into transformers' module
    (mergers' output projections start 10x larger, so the few steps make the text read the frames)."""
    fixture, hf_class, patch = FAMILIES[request.param]
    path = request.getfixturevalue(fixture)
    model, params = model_lib.load_model(str(path))
    params = {k: v * 10 if "merger" in k and ("linear_fc2" in k or "mlp.2" in k) else v.clone()
              for k, v in params.items()}
    spec = model.vision_spec(PAD)
    tx = optim.adamw(1e-2, max_grad_norm=1.0)
    state = init_train_state(params, tx)
    train_step = step_lib.make_train_step(model, tx, lambda step: torch.tensor(1e-2))
    g = torch.Generator().manual_seed(0)
    split = request.param == "qwen3_vl"
    losses = []
    for step in range(STEPS):
        rows = [ROWS[(step + i) % len(ROWS)] for i in range(2)]
        state, metrics = train_step(state, [make_batch(g, spec, rows, patch, split_frames=split)[0]])
        losses.append(float(metrics["train/loss"]))
    hf = hf_class.from_pretrained(str(path), dtype=torch.float32)
    hf.load_state_dict(state.params, strict=False)  # tied: lm_head.weight is the embedding
    hf.train()
    return request.param, hf, spec, patch, losses


def test_video_loss_and_grads_equal_transformers(trained):
    name, hf, spec, patch, losses = trained
    model, params = model_lib.model_from_module(hf, model_lib.family_named(name))
    hf.requires_grad_(True)
    split = name == "qwen3_vl"
    batch, hf_inputs = make_batch(torch.Generator().manual_seed(1), spec, ROWS, patch, split_frames=split)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    ours = model_lib.token_nll(model, leaves, batch).mean()
    grads = torch.autograd.grad(ours, list(leaves.values()), materialize_grads=True)
    hf.zero_grad()
    loss = hf(**hf_inputs).loss
    loss.backward()
    torch.testing.assert_close(ours, loss, rtol=1e-5, atol=1e-5)
    hf_params = dict(hf.named_parameters())
    for key, grad in zip(leaves, grads):
        theirs = hf_params[key].grad
        torch.testing.assert_close(grad, torch.zeros_like(grad) if theirs is None else theirs, rtol=1e-5,
                                   atol=1e-5, msg=key)
    assert float(loss) < 0.5 * losses[0], losses  # trained off its init

    # Reversing each video's frame groups (pixels only: positions and timestamps stay) moves the loss and the
    # answer logits far more than the tolerance, so a frame-order or temporal-position bug cannot pass the above.
    reversed_batch, _ = make_batch(torch.Generator().manual_seed(1), spec, ROWS, patch, split_frames=split,
                                   reverse=True)
    with torch.no_grad():
        def logits(b):
            return model_lib.label_logits(model, params, model_lib.forward_hidden(model, params, b), b["label_index"])
        moved = (logits(reversed_batch) - logits(batch)).abs().max()
        loss_moved = float(model_lib.token_nll(model, params, reversed_batch).mean()) - float(loss)
    assert moved > 1e-2 and abs(loss_moved) > 1e-4, (float(moved), loss_moved)


def test_packed_video_rows_equal_unpacked(trained):
    """Packing (data.packing) concatenates video rows with their own positions: every token's loss is unchanged."""
    name, hf, spec, patch, _ = trained
    model, params = model_lib.model_from_module(hf, model_lib.family_named(name))
    split = name == "qwen3_vl"
    batch, _ = make_batch(torch.Generator().manual_seed(2), spec, ROWS, patch, split_frames=split)
    packed, _ = make_batch(torch.Generator().manual_seed(2), spec, ROWS, patch, split_frames=split, packed=True)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        torch.testing.assert_close(model_lib.token_nll(model, params, packed),
                                   model_lib.token_nll(model, params, batch), rtol=1e-5, atol=1e-5)
