# Each target sets up what is missing (virtual environment .venv, torch, the package), then runs.
# The logic lives in scripts/dev.sh; pass arguments with ARGS="...".
.PHONY: quickstart bench demo test setup
quickstart:
	@bash scripts/dev.sh quickstart $(ARGS)
bench:
	@bash scripts/dev.sh bench $(ARGS)
demo:
	@bash scripts/dev.sh demo $(ARGS)
test:
	@bash scripts/dev.sh test $(ARGS)
setup:
	@bash scripts/dev.sh setup
