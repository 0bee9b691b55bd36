"""Template tags of the engine's admin pages."""

from django import template

from sagas.attention import attention_lines

register = template.Library()


@register.inclusion_tag("admin/sagas/attention_panel.html", takes_context=True)
def sagas_attention_panel(context) -> dict:
    """The "needs attention" panel, for staff who may view sagas."""
    request = context.get("request")
    if request is None or not request.user.has_perm("sagas.view_sagainstance"):
        return {"lines": None}
    return {"lines": attention_lines()}
