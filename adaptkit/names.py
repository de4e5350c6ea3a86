"""Names shared across adaptkit's layers. The bottom layer: it imports nothing from adaptkit (tests/test_layers.py
checks it), so any module may import from here without a cycle. Add a name here when two layers need it."""

# --- adapter folders -------------------------------------------------------------------------------------
FORMAT = "adaptkit-adapter/1"
CONFIG_NAME = "adaptkit_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name: PEFT strategies' tensors (and older native folders)
# native strategies' tensors: the name the stock transformers Trainer reloads checkpoints and the best model
# from (it would look for pytorch_model.bin beside an adapter_model.safetensors of a non-PEFT model)
NATIVE_WEIGHTS_NAME = "model.safetensors"
ADAPTKIT_MODEL_TYPE = "adaptkit"  # config.json's model_type in native partial folders

# --- attributes adaptkit sets on models ------------------------------------------------------------------
MARKER = "_adaptkit_strategy"  # attribute set on every model adapt() returns
# names of the tensors a native strategy trains, recorded when it is applied or loaded: a model loaded
# frozen (or frozen by the user) still saves them, instead of writing an empty adapter
OWNED = "_adaptkit_owned"
# set by whoever builds a base with from_config (model.__dict__[FROM_CONFIG_SEED] = seed): the folder records
# the seed, and adaptkit.load refuses a base with other weights, naming it
FROM_CONFIG_SEED = "_adaptkit_from_config_seed"

# --- vocabularies ----------------------------------------------------------------------------------------
# task -> transformers Auto class. "auto" picks from the config's architectures (see skeleton.infer_task).
TASKS = {"seq_cls": "AutoModelForSequenceClassification", "token_cls": "AutoModelForTokenClassification",
         "qa": "AutoModelForQuestionAnswering", "causal_lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
         "image_cls": "AutoModelForImageClassification", "base": "AutoModel"}
CLASSIFICATION_TASKS = ("seq_cls", "token_cls", "image_cls")
QUANTIZATIONS = ("8bit", "4bit")
EXPECTED_ENV = "ADAPTKIT_PROCESSES"  # "I asked for N processes", for launchers that drop the count
# the launch line that really starts N CPU processes (`accelerate launch --cpu --num_processes 2` runs one)
CPU_LAUNCH = ("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} --num_machines 1 "
              "--mixed_precision no --dynamo_backend no <script> ...")

# --- private attributes of the libraries adaptkit sits on --------------------------------------------------
# Each use of a private (underscore) attribute of peft / accelerate / transformers / evaluate, where no public
# way exists: "module:Attribute.path" -> (the version it was checked on, where adaptkit uses it, why).
# tests/test_layers.py fails when one of them disappears from the installed library.
PRIVATE_APIS: dict[str, tuple[str, str, str]] = {
    "peft.utils.other:_prepare_prompt_learning_config": (
        "peft 0.21.2", "adaptkit/layout.py read_peft_config",
        "PEFT's own sizing of a prefix (a grouped-query model's is as wide as its key/value heads); no public call "
        "returns the sizes PEFT would build, and a saved prefix of other sizes fails only at the first forward"),
}
