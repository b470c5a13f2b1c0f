"""Recipes: the one YAML dialect (``_base_``, typed ``key=value`` overrides, did-you-mean) in
:mod:`rclip_core.config.loader`, the sections every training recipe shares in
:mod:`rclip_core.config.sections`, and the recipes of ``rclip pretrain``
(:mod:`rclip_core.config.pretrain`) and ``rclip finetune`` (:mod:`rclip_core.config.finetune`)."""

from rclip_core.config.loader import (
                                      RunConfig,
                                      apply_overrides,
                                      build_recipe,
                                      dump_recipe,
                                      load_recipe,
                                      parse_override_args,
                                      recipe_to_dict,
)

__all__ = ["RunConfig", "load_recipe", "build_recipe", "apply_overrides", "recipe_to_dict", "dump_recipe",
           "parse_override_args"]
