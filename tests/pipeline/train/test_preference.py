"""The preference objectives against TRL's own computation, on a tiny model, padded and padding-free."""

from __future__ import annotations

import types

import pytest
import torch

from loratui.pipeline.train.fast import IGNORE, register_attention
from loratui.pipeline.train.preference import (
    PreferenceCollator,
    SequenceLogps,
    dpo_loss,
    kto_loss,
    orpo_loss,
    sequence_logps,
)

PAIRS = [
    ("Which shelf holds the atlases?", " Shelf four, by the window.", " I am not sure, maybe somewhere upstairs."),
    ("When does the library open on Sunday?", " At ten.", " The library is a place with many books."),
    ("Can you recommend a pasta recipe?", " I can only help with the library.", " Boil pasta and add sauce."),
]


@pytest.fixture(scope="module")
def peaked_llama(tiny_model_factory, tmp_path_factory):
    """The tiny llama with its (tied) embeddings scaled up: a random tiny model predicts a nearly uniform
    distribution that an adapter hardly moves; peaked logits make the rewards large against float noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_factory(family="llama", tokenizer="bpe")
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(40)
    out = tmp_path_factory.mktemp("peaked-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
    return out


def _peft_model(path, attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config)  # random A and B: the policy differs from the reference
    with torch.no_grad():  # far enough that rewards are well above float noise (about 1e-5 of a log-prob)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    model.train()
    return model


def _trl_dpo(path, tmp_path, sft_weight: float):
    """TRL's DPOTrainer on PAIRS with the base as an explicit reference: (its tokenized rows, loss, metrics)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = _peft_model(path, "eager")
    reference = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
    data = Dataset.from_dict({k: [p[i] for p in PAIRS] for i, k in enumerate(("prompt", "chosen", "rejected"))})
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        loss_type=["sigmoid", "sft"] if sft_weight else ["sigmoid"],
        loss_weights=[1.0, sft_weight] if sft_weight else None,
        per_device_train_batch_size=len(PAIRS),
        report_to="none",
        use_cpu=True,
        max_length=None,
    )
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    rows = [dict(r) for r in trainer.train_dataset]
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return rows, float(loss), metrics


def _features(rows):
    """TRL's tokenized rows in the data step's processed shape (labels -100 on the prompt)."""
    out = []
    for r in rows:
        prompt = list(r["prompt_ids"])
        out.append(
            {
                "input_ids": prompt + list(r["chosen_ids"]),
                "labels": [IGNORE] * len(prompt) + list(r["chosen_ids"]),
                "rejected_input_ids": prompt + list(r["rejected_ids"]),
                "rejected_labels": [IGNORE] * len(prompt) + list(r["rejected_ids"]),
            }
        )
    return out


def _ours(path, features, padding_free: bool, objective: str = "dpo"):
    attn = register_attention() if padding_free else "eager"
    model = _peft_model(path, attn)
    batch = PreferenceCollator(objective, padding_free, pad_id=0, share_prefix=True)(features)
    n = 2 * len(features)
    policy = sequence_logps(model, batch, n)
    with torch.no_grad(), model.disable_adapter():
        reference = sequence_logps(model, batch, n)
    return model, batch, policy, reference


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("sft_weight", [0.0, 0.5], ids=["dpo", "rpo"])
def test_dpo_loss_and_rewards_equal_trl(peaked_llama, tmp_path, padding_free, sft_weight):
    rows, trl_loss, trl = _trl_dpo(peaked_llama, tmp_path, sft_weight)
    _, _, policy, reference = _ours(peaked_llama, _features(rows), padding_free)
    loss, ours = dpo_loss(policy, reference, beta=0.1, sft_weight=sft_weight)
    # the adapter moved the policy far from the reference: the check has something to compare
    assert abs(trl["rewards/chosen"]) > 0.1 and abs(trl["rewards/margins"]) > 0.1
    # two separately built fp32 forwards of the same weights agree to about 2e-5 of a summed log-prob
    tol = dict(rel=1e-3, abs=1e-4)
    assert float(loss) == pytest.approx(trl_loss, **tol)
    assert float(ours["reward_chosen"]) == pytest.approx(trl["rewards/chosen"], **tol)
    assert float(ours["reward_rejected"]) == pytest.approx(trl["rewards/rejected"], **tol)
    assert float(ours["reward_margin"]) == pytest.approx(trl["rewards/margins"], **tol)
    assert float(ours["reward_accuracy"]) == pytest.approx(trl["rewards/accuracies"])
    chosen, rejected = policy.sums.chunk(2)
    assert float(chosen.mean()) == pytest.approx(trl["logps/chosen"], rel=1e-5)
    assert float(rejected.mean()) == pytest.approx(trl["logps/rejected"], rel=1e-5)


def test_padding_free_and_padded_give_the_same_gradients(tiny_llama):
    rows = []
    torch.manual_seed(1)
    for n in (5, 9, 7):
        prompt = torch.randint(3, 60, (n,)).tolist()
        rows.append({"prompt_ids": prompt, "chosen_ids": [11, 12, 13], "rejected_ids": [14, 15, 16, 17, 18]})
    grads = []
    for padding_free in (False, True):
        model, _, policy, reference = _ours(tiny_llama, _features(rows), padding_free)
        loss, _ = dpo_loss(policy, reference, beta=0.1)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5)


def test_the_shared_prompt_is_computed_once_when_packed(tiny_llama):
    prompt = list(range(3, 15))
    rows = [{"prompt_ids": prompt, "chosen_ids": [20, 21], "rejected_ids": [22, 23, 24]}]
    batch = PreferenceCollator("dpo", True, pad_id=0)(_features(rows))
    # the prompt minus its last token (which predicts each reply's first token) is shared
    assert int(batch["loratui_prefix"]) == len(prompt) - 1
    assert batch["input_ids"].shape[1] == len(prompt) - 1 + 3 + 4
    assert batch["loratui_segment"].tolist() == [-1] * 11 + [0] * 3 + [1] * 4


def test_orpo_equals_trl_odds_ratio_loss(tiny_llama):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    rows = [
        {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]},
        {"prompt_ids": [15, 16], "chosen_ids": [17, 18, 19], "rejected_ids": [20]},
    ]
    features = _features(rows)
    model, batch, policy, _ = _ours(tiny_llama, features, padding_free=False, objective="orpo")
    loss, ours = orpo_loss(policy, beta=0.2)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    means = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    fake = types.SimpleNamespace(beta=0.2, accelerator=types.SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, _, log_odds = ORPOTrainer.odds_ratio_loss(fake, *means.chunk(2))
    labels = batch["labels"][: len(rows), 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[: len(rows), :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE
    )
    assert float(loss) == pytest.approx(float(nll - losses.mean()), rel=1e-5)
    assert float(ours["reward_chosen"]) == pytest.approx(float(chosen_rewards.mean()), rel=1e-5)
    assert float(ours["reward_rejected"]) == pytest.approx(float(rejected_rewards.mean()), rel=1e-5)
    assert float(ours["log_odds_ratio"]) == pytest.approx(float(log_odds), rel=1e-5)


def test_kto_follows_the_paper():
    beta = 0.5
    own = torch.tensor([-3.0, -5.0, -2.0])
    ref_own = torch.tensor([-4.0, -4.0, -2.5])
    kl_policy, kl_reference = torch.tensor([-7.0, -6.0, -9.0]), torch.tensor([-7.5, -6.0, -9.1])
    policy = SequenceLogps(torch.cat([own, kl_policy]), torch.ones(6, dtype=torch.long))
    reference = SequenceLogps(torch.cat([ref_own, kl_reference]), torch.ones(6, dtype=torch.long))
    labels = torch.tensor([1, 0, 1])
    loss, metrics = kto_loss(policy, reference, labels, beta, weights=(1.0, 2.0))
    kl = max(0.0, float((kl_policy - kl_reference).mean()))
    ratio = own - ref_own
    expected = torch.stack(
        [
            1 - torch.sigmoid(beta * (ratio[0] - kl)),
            1 - torch.sigmoid(beta * (ratio[2] - kl)),
            2.0 * (1 - torch.sigmoid(beta * (kl - ratio[1]))),
        ]
    ).mean()
    assert float(loss) == pytest.approx(float(expected))
    assert float(metrics["kl"]) == pytest.approx(kl)
    assert float(metrics["reward_chosen"]) == pytest.approx(float(beta * ratio[[0, 2]].mean()))
    assert float(metrics["reward_rejected"]) == pytest.approx(float(beta * ratio[1]))


def test_kto_pairs_each_prompt_with_the_next_rows_completion():
    rows = [
        {"input_ids": [1, 2, 3, 4], "labels": [IGNORE, IGNORE, 3, 4], "preference_label": 1},
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "preference_label": 0},
    ]
    batch = PreferenceCollator("kto", False, pad_id=0)(rows)
    ids = batch["input_ids"].tolist()
    assert ids[2][:4] == [1, 2, 6, 7]  # row 0's prompt, row 1's completion
    assert ids[3][:3] == [5, 3, 4]  # row 1's prompt, row 0's completion
    assert batch["preference_label"].tolist() == [1, 0]
    assert batch["labels"].tolist()[2][:4] == [IGNORE, IGNORE, 6, 7]
