from setuptools import find_packages, setup

setup(
    name="tf_membptt",
    version="0.1.0",
    description="Memory-efficient backpropagation through time for Keras 3 / TensorFlow "
                "(Gruslys et al., NeurIPS 2016): train RNNs on long sequences within a memory budget.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tf_membptt", "tf_membptt.*"]),
    python_requires=">=3.10",
    install_requires=["tensorflow>=2.16", "keras>=3", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "matplotlib"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["tf-membptt=tf_membptt.cli:main"]},
)
