"""The numbered migrations, one file each, loaded by Alembic from this folder (a package
only so that setuptools ships it with the rest of storage/)."""
