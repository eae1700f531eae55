"""Generate text from a LitGPT checkpoint folder (what ``litgpt generate <dir>`` does, in-process)."""

from __future__ import annotations

from pathlib import Path


def generate_sample(
    checkpoint_dir: Path,
    prompt: str,
    max_new_tokens: int = 80,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 1234,
) -> str:
    """Sample a continuation of ``prompt`` from the model in ``checkpoint_dir`` on the CPU.

    ``checkpoint_dir`` is a folder the engine wrote (``lit_model.pth``, ``model_config.yaml`` and
    the tokenizer files). Returns the prompt followed by the generated text.

    Raises:
        FileNotFoundError: a required file is missing from the folder.
    """
    import litgpt
    import torch
    from litgpt.generate.base import generate

    folder = Path(checkpoint_dir)
    config = litgpt.Config.from_file(folder / "model_config.yaml")
    tokenizer = litgpt.Tokenizer(folder)
    torch.manual_seed(seed)
    model = litgpt.GPT(config)
    model.load_state_dict(
        torch.load(folder / "lit_model.pth", map_location="cpu", weights_only=True)
    )
    model.eval()
    encoded = tokenizer.encode(prompt)
    max_returned = min(encoded.numel() + max_new_tokens, config.block_size)
    model.max_seq_length = max_returned
    model.set_kv_cache(batch_size=1, device=torch.device("cpu"))
    with torch.inference_mode():
        out = generate(
            model,
            encoded,
            max_returned_tokens=max_returned,
            temperature=temperature,
            top_k=top_k,
            eos_id=tokenizer.eos_id,
        )
    return tokenizer.decode(out)
