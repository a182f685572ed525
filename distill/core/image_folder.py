"""The one image-folder lister (ROOT/<class>/**/<image>, torchvision ImageFolder's layout), for the SSLD
trainer's folder sources and the transfer datasets alike: the same files in the same order, and symlinks
that loop back into the tree are not followed."""
from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def folder_images(directory, class_to_idx: dict, is_valid_file) -> list[tuple[str, int]]:
    """torchvision's ImageFolder listing (same order), minus what symlinks would add twice.

    A directory symlink is followed only when it leads outside the folder tree (a dataset assembled from
    links); one leading back into it (`ln -s .. train/circle/loop`, an alias of another class) is skipped,
    and every file is listed once, at its real place when it has one inside the tree."""
    directory = os.path.expanduser(str(directory))
    in_tree_dirs, in_tree_files = set(), set()
    for dirpath, _, filenames in os.walk(directory):           # followlinks=False: the tree itself
        in_tree_dirs.add(_inode(dirpath))
        in_tree_files.update(_inode(os.path.join(dirpath, f)) for f in filenames
                             if not os.path.islink(os.path.join(dirpath, f)))
    samples, seen_dirs, seen_files = [], set(), set()
    for target_class in sorted(class_to_idx):
        class_dir = os.path.join(directory, target_class)
        if not os.path.isdir(class_dir):
            continue
        walked = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            seen_dirs.add(_inode(dirpath))
            kept = []
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    try:
                        k = _inode(full)
                    except OSError:                             # a dangling link
                        continue
                    if k in in_tree_dirs or k in seen_dirs:
                        continue
                    seen_dirs.add(k)
                kept.append(d)
            dirnames[:] = kept
            walked.append((dirpath, filenames))
        for dirpath, filenames in sorted(walked):
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not is_valid_file(path):
                    continue
                try:
                    k = _inode(path)
                except OSError:
                    continue
                if k in seen_files or (os.path.islink(path) and k in in_tree_files):
                    continue
                seen_files.add(k)
                samples.append((path, class_to_idx[target_class]))
    return samples


def list_image_folder(root, classes=None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label)]) of an ImageFolder tree: the classes are its sorted sub-folders unless
    given (a val split labelled with train's list), the files those of torchvision's image extensions."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if classes is None else list(classes)
    samples = folder_images(root, {c: i for i, c in enumerate(classes)},
                            lambda p: has_file_allowed_extension(p, IMG_EXTENSIONS))
    return classes, samples


def images_under(root) -> list[str]:
    """Every image file under `root`, any depth, folders and files in sorted order (a pool or a folder to
    predict needs no class folders)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if has_file_allowed_extension(f, IMG_EXTENSIONS)]
    return found
