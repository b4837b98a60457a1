# One command each: `make demo` (set up, then run the main job on the sample video) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# cpu (default) or gpu: onnxruntime and onnxruntime-gpu share one folder, so exactly one is installed.
RUNTIME ?= cpu
BIN := $(VENV)/bin

.PHONY: setup demo console test bench soak clean

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

# The web console on the sample clip as a looped live camera: http://127.0.0.1:8080. The first start
# prints the admin token once; later, make another with
# `.venv/bin/streamer tokens create --gallery out/demo-gallery.db`.
console: setup
	@mkdir -p out
	@test -f out/demo-gallery.db || $(BIN)/streamer gallery add "Eileen Collins" sample_videos/astronaut.jpg \
		--gallery out/demo-gallery.db --allow-download
	$(BIN)/streamer serve --config configs/console.yaml --gallery out/demo-gallery.db --allow-download

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python tools/make_bench_clip.py out/bench-720p.mp4
	$(BIN)/streamer bench out/bench-720p.mp4 --json

# Minutes of a live looped clip and an RTSP camera while workers are killed and stopped, the gallery is
# replaced and the camera restarts; reports RSS at start and end, seq gaps and recovery times. Not in `test`.
SOAK_MINUTES ?= 20
soak: setup
	$(BIN)/python tools/soak.py --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) out .pytest_cache
