#!/usr/bin/env bash
# One-time AWS set-up for cluster/aws-gpu.yaml and aws-gpu-spot.yaml (idempotent where AWS allows it):
#   BUCKET=my-bucket VPC=vpc-... REGION=us-east-1 bash cluster/aws/setup.sh
# Creates: the bucket; IAM roles + instance profiles `nanochat-ray-head` (autoscaler + bucket) and
# `nanochat-ray-worker` (bucket only), each with the bucket-scoped S3 policy of s3-bucket-policy.json; the security
# group `nanochat-ray` (all traffic between its members, as EFA requires; SSH from your address). Prints the values
# to put in the YAML. The workers' subnet must be a private subnet with a NAT gateway (an instance with 32 EFA
# interfaces gets no public IP) in the AZ of your p5 capacity; the head's subnet a public one in the same VPC.
set -euo pipefail
cd "$(dirname "$0")"
: "${BUCKET:?set BUCKET}" "${VPC:?set VPC (vpc-...)}" "${REGION:=us-east-1}"
ACCOUNT_ID=$(aws sts get-caller-identity --query Account --output text)
aws s3api head-bucket --bucket "$BUCKET" 2>/dev/null || aws s3 mb "s3://$BUCKET" --region "$REGION"
bucket_policy=$(sed "s/YOUR-BUCKET/$BUCKET/g" s3-bucket-policy.json)
for who in head worker; do
  role=nanochat-ray-$who
  aws iam get-role --role-name "$role" >/dev/null 2>&1 \
    || aws iam create-role --role-name "$role" --assume-role-policy-document file://trust-ec2.json >/dev/null
  aws iam put-role-policy --role-name "$role" --policy-name nanochat-s3 --policy-document "$bucket_policy"
  aws iam get-instance-profile --instance-profile-name "$role" >/dev/null 2>&1 || {
    aws iam create-instance-profile --instance-profile-name "$role" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role"
  }
done
aws iam put-role-policy --role-name nanochat-ray-head --policy-name ray-autoscaler \
  --policy-document "$(sed "s/ACCOUNT_ID/$ACCOUNT_ID/g" head-autoscaler-policy.json)"
SG=$(aws ec2 describe-security-groups --region "$REGION" --filters Name=group-name,Values=nanochat-ray \
     Name=vpc-id,Values="$VPC" --query 'SecurityGroups[0].GroupId' --output text)
if [ "$SG" = "None" ]; then
  SG=$(aws ec2 create-security-group --region "$REGION" --vpc-id "$VPC" --group-name nanochat-ray \
       --description "nanochat Ray cluster (EFA: all traffic within the group)" --query GroupId --output text)
  aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG" --protocol -1 --source-group "$SG"
  aws ec2 authorize-security-group-egress --region "$REGION" --group-id "$SG" --protocol -1 --source-group "$SG" || true
  MYIP=$(curl -fsS https://checkip.amazonaws.com)
  aws ec2 authorize-security-group-ingress --region "$REGION" --group-id "$SG" --protocol tcp --port 22 --cidr "$MYIP/32"
fi
echo "ACCOUNT_ID=$ACCOUNT_ID  sg-NANOCHAT-ID=$SG  YOUR-BUCKET=$BUCKET"
echo "now: sed -i 's/ACCOUNT_ID/$ACCOUNT_ID/g; s/sg-NANOCHAT-ID/$SG/g; s/YOUR-BUCKET/$BUCKET/g; s/subnet-PRIVATE-ID/<private subnet>/g; s/subnet-PUBLIC-ID/<public subnet>/g' cluster/aws-gpu*.yaml"
