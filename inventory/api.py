from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.generics import ListAPIView

from inventory.selectors import product_list_with_availability


class ProductOutputSerializer(serializers.Serializer):
    sku = serializers.CharField()
    name = serializers.CharField()
    price = serializers.DecimalField(max_digits=12, decimal_places=2)
    currency = serializers.CharField()
    available = serializers.IntegerField()


@extend_schema(summary="The catalogue, with the units available to order")
class ProductListApi(ListAPIView):
    serializer_class = ProductOutputSerializer

    def get_queryset(self):
        return product_list_with_availability()
