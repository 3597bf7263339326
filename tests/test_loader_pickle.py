"""The pickle rule of ``from_pretrained`` holds in the loaders too: LoRA and textual-inversion files in pickle
format (``.bin``/``.pt``, which can run code when loaded) are refused unless ``allow_pickle=True``; diffusers' own
loaders fall back to them silently. (``from_single_file``: tests/test_single_file.py.)"""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


def _pickle_lora(pipe, folder):
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False),
                          adapter_name="tmp")
    layers = get_peft_model_state_dict(pipe.unet, adapter_name="tmp")
    pipe.unet.delete_adapters("tmp")
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=False)
    assert [p.name for p in folder.iterdir()] == ["pytorch_lora_weights.bin"]
    return folder


def test_pickle_lora_is_refused_unless_allowed(sd_pipe, tmp_path):
    folder = _pickle_lora(sd_pipe, tmp_path / "lora")
    with pytest.raises(OSError, match=r"pytorch_lora_weights\.bin' is a pickle file.*allow_pickle=True to load_lora_weights"):
        sd_pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.bin")
    with pytest.raises(OSError, match=r"pytorch_lora_weights\.bin' is a pickle file"):
        sd_pipe.load_lora_weights(folder / "pytorch_lora_weights.bin")
    with pytest.raises(OSError, match=r"no file named pytorch_lora_weights\.safetensors"):  # no silent fallback
        sd_pipe.load_lora_weights(folder)
    with pytest.raises(OSError, match="use_safetensors=False loads pickle files"):
        sd_pipe.load_lora_weights(folder, use_safetensors=False)
    assert sd_pipe.get_list_adapters() == {}
    sd_pipe.load_lora_weights(folder, adapter_name="trusted", allow_pickle=True)
    assert sd_pipe.get_list_adapters() == {"unet": ["trusted"]}


def test_pickle_textual_inversion_is_refused_unless_allowed(sd_pipe, tmp_path):
    torch.save({"<toy>": torch.randn(32)}, tmp_path / "toy.bin")  # the classic single-token .bin layout
    with pytest.raises(OSError, match=r"toy\.bin' is a pickle file.*allow_pickle=True to load_textual_inversion"):
        sd_pipe.load_textual_inversion(tmp_path / "toy.bin")
    with pytest.raises(OSError, match=r"toy\.bin' is a pickle file"):
        sd_pipe.load_textual_inversion([str(tmp_path / "toy.bin")], token=["<toy>"])
    assert "<toy>" not in sd_pipe.tokenizer.get_vocab()
    sd_pipe.load_textual_inversion(tmp_path / "toy.bin", allow_pickle=True)
    assert "<toy>" in sd_pipe.tokenizer.get_vocab()
    sd_pipe.load_textual_inversion({"<mem>": torch.randn(32)})  # in memory: nothing to unpickle
    assert "<mem>" in sd_pipe.tokenizer.get_vocab()
