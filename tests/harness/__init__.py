"""Test harness for Passerelle's system tests and demo: real peers (Orthanc behind nginx TLS, dcmtk,
pynetdicom), generated and real-world DICOM data, and the passerelled daemon under test."""

from . import pynetdicom_race  # noqa: E402,F401  (patches a pynetdicom race before any test sends)
