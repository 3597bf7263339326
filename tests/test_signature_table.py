"""The classic ``__call__`` signatures come from one table (``stepdiff.pipelines.signatures``) and behave as the
hand-written ones did: real named parameters for ``inspect``, ``help()``, positional binding and error messages,
annotations kept, an explicit binding by name in the body. tests/test_signatures.py checks every class against the
classic class of the same name."""

import ast
import inspect
import pydoc
import sys
import traceback
import typing

import diffusers
import pytest

import stepdiff
from stepdiff.control import CancelToken
from stepdiff.pipelines.components import INITS, classic_init
from stepdiff.pipelines.registry import REGISTRY
from stepdiff.pipelines.signatures import SIGNATURES, Signature, classic_call, stub

from .test_signatures import LEFT_OUT, LEFT_OUT_BY_FAMILY

NAMES = [e.name for e in REGISTRY]


class Recorder:
    """Stands in for a pipeline: ``_call`` returns the arguments the generated ``__call__`` bound."""

    def _call(self, arguments):
        return arguments


def test_one_table_entry_per_registered_class():
    assert sorted(SIGNATURES) == sorted(NAMES)
    for name in NAMES:
        call = vars(getattr(stepdiff, name))["__call__"]  # each class has its own, generated from its entry
        assert call.__code__.co_filename == f"<stepdiff.pipelines.signatures {name}.__call__>"
        assert call.__qualname__ == f"{name}.__call__"
        assert call.__module__ == f"stepdiff.pipelines{next(e.module for e in REGISTRY if e.name == name)}"
        assert call.__doc__ == SIGNATURES[name].doc


@pytest.mark.parametrize("entry", REGISTRY, ids=NAMES)
def test_positional_calls_bind_as_in_the_classic_class(entry):
    name = entry.name
    classic = inspect.signature(getattr(diffusers, name).__call__)
    names = [n for n in classic.parameters if n not in ("self", "kwargs")]
    left_out = [names.index(n) for n in {**LEFT_OUT, **LEFT_OUT_BY_FAMILY.get(entry.family, {})} if n in names]
    shared = names[: min(left_out, default=len(names))]  # every classic argument up to the first one left out
    assert len(shared) > 15
    values = [object() for _ in shared]
    bound = getattr(stepdiff, name).__call__(Recorder(), *values)
    expected = classic.bind(None, *values).arguments
    assert [bound[n] for n in shared] == [expected[n] for n in shared]
    ours = inspect.signature(getattr(stepdiff, name).__call__)
    assert list(bound) == list(ours.parameters)[1:], "every parameter is passed on, by name, in order"
    assert all(bound[n] is p.default for n, p in ours.parameters.items() if n not in shared and n != "self")


@pytest.mark.parametrize("name", NAMES)
def test_a_misspelt_keyword_raises_a_type_error_naming_it(name):
    with pytest.raises(TypeError, match="promt"):
        getattr(stepdiff, name).__call__(Recorder(), promt="a red circle")
    with pytest.raises(TypeError, match="prompt"):
        getattr(stepdiff, name).__call__(Recorder(), "a red circle", prompt="twice")


def test_a_real_pipeline_says_which_keyword_is_wrong(sd_pipe):
    with pytest.raises(TypeError, match="num_inference_step'"):
        sd_pipe("a red circle", num_inference_step=2)
    with pytest.raises(TypeError, match="num_inference_step'"):
        sd_pipe.steps("a red circle", num_inference_step=2)


@pytest.mark.parametrize("name", NAMES)
def test_help_and_signature_show_the_real_parameters_and_the_docstring(name):
    call = getattr(stepdiff, name).__call__
    parameters = inspect.signature(call).parameters
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters.values())
    assert list(parameters)[-2:] == ["cancel", "interrupt_output"]
    text = pydoc.render_doc(call, renderer=pydoc.plaintext)
    assert "prompt: 'str | list[str] | None' = None" in text
    assert "interrupt_output: 'str' = 'denoised'" in text
    assert SIGNATURES[name].doc.splitlines()[0] in text


@pytest.mark.parametrize("name", NAMES)
def test_annotations_are_kept_and_resolve(name):
    call = getattr(stepdiff, name).__call__
    assert inspect.signature(call).parameters["prompt"].annotation == "str | list[str] | None"
    hints = typing.get_type_hints(call)
    assert set(hints) == set(inspect.signature(call).parameters) - {"self"}
    assert hints["cancel"] == (CancelToken | None)
    assert hints["prompt"] == (str | list[str] | None)


def test_the_source_binds_by_name_and_shows_in_tracebacks():
    call = stepdiff.StableDiffusionXLInpaintPipeline.__call__
    source = inspect.getsource(call)
    assert '"mask_image": mask_image,' in source and "locals()" not in source
    assert "self._call(" in source

    class Failing:
        def _call(self, arguments):
            raise RuntimeError("boom")

    try:
        call(Failing(), "a red circle")
    except RuntimeError:
        lines = traceback.format_exception(*sys.exc_info())
    assert any("StableDiffusionXLInpaintPipeline.__call__" in line and "return self._call({" in line for line in lines)


def test_stubs_are_python_for_every_class():
    for name in NAMES:
        tree = ast.parse(stub(name))
        function = tree.body[0].body[0]
        assert [a.arg for a in function.args.args][1:] == list(inspect.signature(getattr(stepdiff, name).__call__).parameters)[1:]


def test_the_table_refuses_unknown_names_repeats_and_missing_defaults():
    with pytest.raises(ValueError, match="'promt' is not a parameter"):
        Signature("promt", {}, "").names()
    with pytest.raises(ValueError, match="'prompt' is repeated"):
        Signature("prompt EMBEDS prompt", {}, "").names()
    with pytest.raises(ValueError, match="'strength' needs a default"):
        Signature("prompt strength", {}, "").parameters()


def test_a_class_outside_the_table_can_have_its_own_entry():
    """A toy family passes its own entry; the module is the caller's, as ``collections.namedtuple`` does it."""

    class Toy:
        _call = Recorder._call
        __call__ = classic_call("Toy", Signature("prompt num_inference_steps", {"num_inference_steps": 4}, "Toy."))

    assert Toy()("a red circle") == {"prompt": "a red circle", "num_inference_steps": 4, "cancel": None,
                                     "interrupt_output": "denoised"}
    assert Toy.__call__.__module__ == __name__ and Toy.__call__.__doc__ == "Toy."


# Where stepdiff's constructors differ from the classic ones on purpose: ``name: (ours, classic)``. Safety checkers
# are loaded if present but never run, so none is required; SD3 runs without its T5 encoder (``text_encoder_3=None``).
INIT_DEFAULTS_NOT_CLASSIC = {
    "safety_checker": (None, inspect.Parameter.empty),
    "feature_extractor": (None, inspect.Parameter.empty),
    "requires_safety_checker": (False, True),
    "text_encoder_3": (None, inspect.Parameter.empty),
    "tokenizer_3": (None, inspect.Parameter.empty),
}


@pytest.mark.parametrize("entry", REGISTRY, ids=NAMES)
def test_init_takes_the_classic_components_in_order_with_the_classic_defaults(entry):
    """``from_pretrained`` reads ``inspect.signature(cls.__init__)`` for the components and config arguments."""
    ours = inspect.signature(getattr(stepdiff, entry.name).__init__).parameters
    classic = inspect.signature(getattr(diffusers, entry.name).__init__).parameters
    assert list(ours) == list(classic)
    for name, parameter in ours.items():
        expected = classic[name].default
        if name in INIT_DEFAULTS_NOT_CLASSIC and expected == INIT_DEFAULTS_NOT_CLASSIC[name][1]:
            expected = INIT_DEFAULTS_NOT_CLASSIC[name][0]
        assert parameter.default == expected, name


@pytest.mark.parametrize("name", NAMES)
def test_init_comes_from_the_component_table_and_its_annotations_resolve(name):
    init = getattr(stepdiff, name).__init__
    assert init.__code__.co_filename.startswith("<stepdiff.pipelines.signatures ")
    assert init.__code__.co_filename.endswith(".__init__>")
    hints = typing.get_type_hints(init)
    assert hints["vae"] is diffusers.AutoencoderKL and hints["return"] is type(None)
    source = inspect.getsource(init)
    assert "    self._init_components(\n        {\"" in source and '"vae": vae,' in source and "locals()" not in source


def test_init_hands_components_and_config_on_by_name():
    class Recorder:
        def _init_components(self, modules, config):
            self.got = modules, config

    init = classic_init("StableDiffusionXLImg2ImgPipeline")
    recorder = Recorder()
    init(recorder, *"abcdefg", feature_extractor="f", requires_aesthetics_score=True)
    modules, config = recorder.got
    assert modules == {
        "vae": "a", "text_encoder": "b", "text_encoder_2": "c", "tokenizer": "d", "tokenizer_2": "e", "unet": "f",
        "scheduler": "g", "image_encoder": None, "feature_extractor": "f",
    }
    assert config == {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": True, "add_watermarker": None}
    with pytest.raises(TypeError, match="unet"):
        init(recorder, *"abcde")
    assert sorted(INITS) == sorted({getattr(stepdiff, n).__init__.__qualname__.split(".")[0] for n in NAMES})
