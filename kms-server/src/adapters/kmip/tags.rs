//! The KMIP tags and enumeration values Keyhold reads or writes (KMIP 1.4 §9.1.3.1 and
//! §9.1.3.2; KMIP 2.1 §11 for the 2.x additions). Checked against PyKMIP 0.11's
//! `kmip.core.enums`.

#![allow(missing_docs)]

use super::ttlv::Tag;

// Tags.
pub const ACTIVATION_DATE: Tag = 0x420001;
pub const ATTRIBUTE: Tag = 0x420008;
pub const ATTRIBUTE_INDEX: Tag = 0x420009;
pub const ATTRIBUTE_NAME: Tag = 0x42000A;
pub const ATTRIBUTE_VALUE: Tag = 0x42000B;
pub const AUTHENTICATION: Tag = 0x42000C;
pub const BATCH_COUNT: Tag = 0x42000D;
pub const BATCH_ERROR_CONTINUATION_OPTION: Tag = 0x42000E;
pub const BATCH_ITEM: Tag = 0x42000F;
pub const BATCH_ORDER_OPTION: Tag = 0x420010;
pub const BLOCK_CIPHER_MODE: Tag = 0x420011;
pub const CRYPTOGRAPHIC_ALGORITHM: Tag = 0x420028;
pub const CRYPTOGRAPHIC_LENGTH: Tag = 0x42002A;
pub const CRYPTOGRAPHIC_PARAMETERS: Tag = 0x42002B;
pub const CRYPTOGRAPHIC_USAGE_MASK: Tag = 0x42002C;
pub const DEACTIVATION_DATE: Tag = 0x42002F;
pub const DIGEST: Tag = 0x420034;
pub const DIGEST_VALUE: Tag = 0x420035;
pub const HASHING_ALGORITHM: Tag = 0x420038;
pub const DESTROY_DATE: Tag = 0x420033;
pub const INITIAL_DATE: Tag = 0x420039;
pub const IV_COUNTER_NONCE: Tag = 0x42003D;
pub const KEY_BLOCK: Tag = 0x420040;
pub const KEY_FORMAT_TYPE: Tag = 0x420042;
pub const KEY_MATERIAL: Tag = 0x420043;
pub const KEY_WRAPPING_DATA: Tag = 0x420046;
pub const KEY_VALUE: Tag = 0x420045;
pub const LAST_CHANGE_DATE: Tag = 0x420048;
pub const MAXIMUM_ITEMS: Tag = 0x42004F;
pub const MAXIMUM_RESPONSE_SIZE: Tag = 0x420050;
pub const NAME: Tag = 0x420053;
pub const NAME_TYPE: Tag = 0x420054;
pub const NAME_VALUE: Tag = 0x420055;
pub const OBJECT_GROUP: Tag = 0x420056;
pub const OBJECT_TYPE: Tag = 0x420057;
pub const OPERATION: Tag = 0x42005C;
pub const OPERATION_POLICY_NAME: Tag = 0x42005D;
pub const PADDING_METHOD: Tag = 0x42005F;
pub const PROTOCOL_VERSION: Tag = 0x420069;
pub const PROTOCOL_VERSION_MAJOR: Tag = 0x42006A;
pub const PROTOCOL_VERSION_MINOR: Tag = 0x42006B;
pub const QUERY_FUNCTION: Tag = 0x420074;
pub const REQUEST_HEADER: Tag = 0x420077;
pub const REQUEST_MESSAGE: Tag = 0x420078;
pub const REQUEST_PAYLOAD: Tag = 0x420079;
pub const RESPONSE_HEADER: Tag = 0x42007A;
pub const RESPONSE_MESSAGE: Tag = 0x42007B;
pub const RESPONSE_PAYLOAD: Tag = 0x42007C;
pub const RESULT_MESSAGE: Tag = 0x42007D;
pub const RESULT_REASON: Tag = 0x42007E;
pub const RESULT_STATUS: Tag = 0x42007F;
pub const REVOCATION_MESSAGE: Tag = 0x420080;
pub const REVOCATION_REASON: Tag = 0x420081;
pub const REVOCATION_REASON_CODE: Tag = 0x420082;
pub const SECRET_DATA: Tag = 0x420085;
pub const SECRET_DATA_TYPE: Tag = 0x420086;
pub const SERVER_INFORMATION: Tag = 0x420088;
pub const STATE: Tag = 0x42008D;
pub const SYMMETRIC_KEY: Tag = 0x42008F;
pub const TEMPLATE_ATTRIBUTE: Tag = 0x420091;
pub const TIME_STAMP: Tag = 0x420092;
pub const UNIQUE_BATCH_ITEM_ID: Tag = 0x420093;
pub const UNIQUE_IDENTIFIER: Tag = 0x420094;
pub const VENDOR_IDENTIFICATION: Tag = 0x42009D;
pub const DATA: Tag = 0x4200C2;
pub const RANDOM_IV: Tag = 0x4200C5;
pub const TAG_LENGTH: Tag = 0x4200CE;
pub const OFFSET_ITEMS: Tag = 0x4200D4;
pub const LOCATED_ITEMS: Tag = 0x4200D5;
pub const AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA: Tag = 0x4200FE;
pub const AUTHENTICATED_ENCRYPTION_TAG: Tag = 0x4200FF;
pub const ATTRIBUTES: Tag = 0x420125;
pub const EXTRACTABLE: Tag = 0x420122;
pub const ATTRIBUTE_REFERENCE: Tag = 0x42013B;
pub const CURRENT_ATTRIBUTE: Tag = 0x42013C;
pub const NEW_ATTRIBUTE: Tag = 0x42013D;
pub const COMPROMISE_DATE: Tag = 0x420020;
pub const CONTACT_INFORMATION: Tag = 0x420022;
pub const SENSITIVE: Tag = 0x420120;

// Operation.
pub const OP_CREATE: u32 = 0x01;
pub const OP_REGISTER: u32 = 0x03;
pub const OP_LOCATE: u32 = 0x08;
pub const OP_GET: u32 = 0x0A;
pub const OP_GET_ATTRIBUTES: u32 = 0x0B;
pub const OP_GET_ATTRIBUTE_LIST: u32 = 0x0C;
pub const OP_ADD_ATTRIBUTE: u32 = 0x0D;
pub const OP_MODIFY_ATTRIBUTE: u32 = 0x0E;
pub const OP_DELETE_ATTRIBUTE: u32 = 0x0F;
pub const OP_ACTIVATE: u32 = 0x12;
pub const OP_REVOKE: u32 = 0x13;
pub const OP_DESTROY: u32 = 0x14;
pub const OP_QUERY: u32 = 0x18;
pub const OP_DISCOVER_VERSIONS: u32 = 0x1E;
pub const OP_ENCRYPT: u32 = 0x1F;
pub const OP_DECRYPT: u32 = 0x20;

// Object Type.
pub const OBJECT_SYMMETRIC_KEY: u32 = 0x02;
pub const OBJECT_SECRET_DATA: u32 = 0x07;

// Result Status.
pub const STATUS_SUCCESS: u32 = 0x00;
pub const STATUS_OPERATION_FAILED: u32 = 0x01;

// Result Reason.
pub const REASON_ITEM_NOT_FOUND: u32 = 0x01;
pub const REASON_RESPONSE_TOO_LARGE: u32 = 0x02;
pub const REASON_AUTHENTICATION_NOT_SUCCESSFUL: u32 = 0x03;
pub const REASON_INVALID_MESSAGE: u32 = 0x04;
pub const REASON_OPERATION_NOT_SUPPORTED: u32 = 0x05;
pub const REASON_MISSING_DATA: u32 = 0x06;
pub const REASON_INVALID_FIELD: u32 = 0x07;
pub const REASON_FEATURE_NOT_SUPPORTED: u32 = 0x08;
pub const REASON_CRYPTOGRAPHIC_FAILURE: u32 = 0x0A;
pub const REASON_ILLEGAL_OPERATION: u32 = 0x0B;
pub const REASON_PERMISSION_DENIED: u32 = 0x0C;
pub const REASON_KEY_FORMAT_TYPE_NOT_SUPPORTED: u32 = 0x10;
pub const REASON_NOT_EXTRACTABLE: u32 = 0x17;
pub const REASON_OBJECT_ALREADY_EXISTS: u32 = 0x18;
pub const REASON_ATTRIBUTE_READ_ONLY: u32 = 0x22;
pub const REASON_WRONG_KEY_LIFECYCLE_STATE: u32 = 0x43;
pub const REASON_GENERAL_FAILURE: u32 = 0x100;

// State.
pub const STATE_PRE_ACTIVE: u32 = 0x01;
pub const STATE_ACTIVE: u32 = 0x02;
pub const STATE_DEACTIVATED: u32 = 0x03;
pub const STATE_COMPROMISED: u32 = 0x04;
pub const STATE_DESTROYED: u32 = 0x05;

// Cryptographic Algorithm, Block Cipher Mode, Padding Method, Key Format Type.
pub const ALGORITHM_AES: u32 = 0x03;
pub const MODE_CBC: u32 = 0x01;
pub const MODE_GCM: u32 = 0x09;
pub const PADDING_NONE: u32 = 0x01;
pub const PADDING_PKCS5: u32 = 0x03;
pub const KEY_FORMAT_RAW: u32 = 0x01;
pub const KEY_FORMAT_OPAQUE: u32 = 0x02;
pub const HASH_SHA_256: u32 = 0x06;

// Name Type.
pub const NAME_TEXT: u32 = 0x01;

// Revocation Reason Code.
pub const REVOKE_KEY_COMPROMISE: u32 = 0x02;

// Query Function.
pub const QUERY_OPERATIONS: u32 = 0x01;
pub const QUERY_OBJECTS: u32 = 0x02;
pub const QUERY_SERVER_INFORMATION: u32 = 0x03;

// Cryptographic Usage Mask bits.
pub const USAGE_ENCRYPT: i32 = 0x04;
pub const USAGE_DECRYPT: i32 = 0x08;
