# TempMail: `make run` and `make test` do all the set-up a fresh machine needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
FLASK  := $(VENV)/bin/flask
HOST   ?= 127.0.0.1
PORT   ?= 8000
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the test suite starts for real, as "command-or-file:package":
# PostgreSQL's server (tests/conftest.py runs initdb/pg_ctl from
# /usr/lib/postgresql/*/bin), Chromium for the browser tests and libatomic1
# for the node driver that Playwright's wheel bundles (a bare Debian lacks
# it), Dovecot for IMAP ingest, swaks for manual checks, Postfix as the front
# end tests/test_postfix_front.py runs (its own instance, never the system's),
# Node.js and PHP to run the webhook receivers /docs shows, openssl and curl
# for its cURL sample, openssl for an HTTPS receiver's certificate
# (tests/test_webhooks*.py),
# iproute2's `ip` for the network namespaces of the cluster test (tests/cluster/).
# Add a line here for anything new a test starts.
TEST_DEBS := /usr/lib/postgresql/*/bin/initdb:postgresql \
             chromium:chromium \
             /usr/lib/*/libatomic.so.1:libatomic1 \
             /usr/sbin/dovecot:dovecot-imapd \
             swaks:swaks \
             /usr/sbin/postfix:postfix \
             node:nodejs \
             php:php-cli \
             openssl:openssl \
             curl:curl \
             /bin/ip:iproute2

.PHONY: run test venv system-deps init-db clean bench messages compile-messages

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

init-db: venv
	$(FLASK) --app app init-db

# The web app (gunicorn) and the mail daemon run together in the foreground;
# Ctrl-C (or TERM) stops both: deploy/run.sh supervises them and shares
# METRICS_DIR (emptied at start) between them for /metrics.
METRICS_DIR ?= instance/metrics
run: init-db
	VENV=$(VENV) METRICS_DIR=$(METRICS_DIR) exec deploy/run.sh $(HOST) $(PORT)

# Installs each TEST_DEBS package whose command or file is missing.
system-deps:
	@missing=""; \
	for entry in $(TEST_DEBS); do \
	  probe=$${entry%:*}; package=$${entry##*:}; \
	  case $$probe in \
	    /*) found=""; for f in $$probe; do [ -e "$$f" ] && found=1; done ;; \
	    *) found=$$(command -v $$probe || true) ;; \
	  esac; \
	  [ -n "$$found" ] || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

test: venv system-deps
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) instance/tempmail.db* $(METRICS_DIR)/*.db .pytest_cache

# Page translations (Flask-Babel): `messages` re-extracts the strings of the
# pages into translations/messages.pot and merges them into each language's
# .po; `compile-messages` writes the .mo files, which are committed, so
# `make run` on a fresh machine needs no compile step.
I18N_SOURCES := accounts.py apidocs.py languages.py web.py templates
messages: venv
	$(VENV)/bin/pybabel extract -F babel.cfg --no-wrap --project TempMail \
	  --copyright-holder "TempMail contributors" -o translations/messages.pot $(I18N_SOURCES)
	$(VENV)/bin/pybabel update --no-wrap --no-fuzzy-matching -i translations/messages.pot -d translations

compile-messages: venv
	$(VENV)/bin/pybabel compile -d translations --statistics
