"""The adversarial suite (issue 8): nothing lost, no one gets in. See SECURITY.md."""
