"""vdeliver: local delivery agent and account toolkit for virtual mail hosting on sendmail."""

__version__ = "0.1.0"
