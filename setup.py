# Everything else is in pyproject.toml; the compiled module is declared here because pyproject.toml's form for it is
# still experimental in setuptools. Cython compiles the .pyx ([build-system] requires it).
from setuptools import Extension, setup

setup(ext_modules=[Extension("appliance.policy._requestpath", ["appliance/policy/_requestpath.pyx"])])
