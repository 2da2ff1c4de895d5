# TempMail: `make run` and `make test` do all the set-up a fresh machine needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
FLASK  := $(VENV)/bin/flask
HOST   ?= 127.0.0.1
PORT   ?= 8000
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the test suite drives for real: Chromium for the browser
# tests, Dovecot for IMAP ingest, swaks for manual checks, Postfix as the
# front end tests/test_postfix_front.py runs (its own instance, never the system's),
# iproute2's `ip` for the network namespaces of tests/cluster/.
TEST_DEBS := chromium dovecot-imapd swaks postfix iproute2

.PHONY: run test venv system-deps init-db clean bench

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

init-db: venv
	$(FLASK) --app app init-db

# The web app (gunicorn, with deploy/gunicorn.conf.py's settings: logs that
# mask mailbox tokens) and the mail daemon run together in the foreground;
# Ctrl-C stops both.
run: init-db
	@echo "Web app on http://$(HOST):$(PORT)/ ; mail daemon as configured (flask smtpd)"
	@trap 'kill 0' INT TERM EXIT; \
	$(VENV)/bin/gunicorn --config deploy/gunicorn.conf.py --bind $(HOST):$(PORT) --workers 2 wsgi:application & \
	$(FLASK) --app app smtpd & \
	wait

system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	[ -x /usr/sbin/dovecot ] || missing="$$missing dovecot-imapd"; \
	command -v swaks >/dev/null || missing="$$missing swaks"; \
	command -v ip >/dev/null || [ -x /sbin/ip ] || missing="$$missing iproute2"; \
	[ -x /usr/sbin/postfix ] || if [ -e /usr/sbin/sendmail ]; then \
	  echo "Not installing Postfix: another MTA owns /usr/sbin/sendmail (tests/test_postfix_front.py needs Postfix)"; \
	else missing="$$missing postfix"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

test: venv system-deps
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) instance/tempmail.db* .pytest_cache
