# One command each: `make demo` (set up, then run the main job on the sample video) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# cpu (default) or gpu: onnxruntime and onnxruntime-gpu share one folder, so exactly one is installed.
RUNTIME ?= cpu
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/streamer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(RUNTIME),test]'
	@touch $@

setup: $(BIN)/streamer

# Enroll the astronaut from her portrait, process the sample clip, print every event, write an
# annotated video. Models come from STREAMER_MODEL_DIR when set, else they are downloaded once
# (sha256-checked) into ~/.cache/streamer.
demo: setup
	@mkdir -p out
	@rm -f out/demo-gallery.db
	$(BIN)/streamer gallery add "Eileen Collins" sample_videos/astronaut.jpg --gallery out/demo-gallery.db --allow-download
	$(BIN)/streamer run sample_videos/astronaut.mp4 --gallery out/demo-gallery.db \
		--output out/astronaut-annotated.mp4 --print-events --allow-download

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python tools/make_bench_clip.py out/bench-720p.mp4
	$(BIN)/streamer bench out/bench-720p.mp4 --json

clean:
	rm -rf $(VENV) out .pytest_cache
